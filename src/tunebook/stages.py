"""Training stages after SFT: TRL's `DPOTrainer` and `GRPOTrainer`, continuing a parent recipe's adapter.

A stage loads the base model and its parent's adapter (trainable), and trains it further:
- **DPO** on preference pairs: the recipe's own `prompt`/`chosen`/`rejected` rows, or pairs made from the parent's
  answers (`pairs.py`: sampled on training prompts and judged by the task's metric, so SQL pairs are
  execution-verified). The reference model is the parent itself: DPOTrainer keeps a frozen copy of the adapter it
  is given (`ref`) and scores the reference with it.
- **GRPO** on training prompts, rewarded by the report's own metrics (`rewards.py`) or a user's function.
Prompts are rendered by `prompts.py`, as in SFT and eval, and the trainers see the end-of-turn token the parent
was trained to stop at as their EOS. The stage's output is one adapter on the same base: eval, export and the app
use it as they use an SFT adapter.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.data import refuse_special_markers
from tunebook.errors import RecipeError
from tunebook.runs import Run, parent_adapter_dir

# Settings tunebook picks for stages (any can be set in the recipe's dpo:/grpo: section).
STAGE_DEFAULTS: dict[str, Any] = {
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "report_to": ["tensorboard"],
    "disable_tqdm": True,
    "gradient_checkpointing": False,
    "ddp_find_unused_parameters": False,
}


def check_parent(recipe: Recipe) -> Path:
    """The parent's adapter, checked before any model loads: it exists, it is whole, and it is the same base."""
    from tunebook.validate import check_adapter, check_parent_recipe

    parent = check_parent_recipe(recipe)
    adapter = parent_adapter_dir(recipe)
    try:
        check_adapter(adapter, parent)
    except RecipeError:
        raise RecipeError(recipe.source, "stage.parent", f"{parent.name} has no trained adapter ({adapter}).",
                          f"Train it first: `tunebook train {parent.command_name}`.") from None
    return adapter


def stage_tokenizer(parent: Path, recipe: Recipe) -> Any:
    """The parent's tokenizer, with EOS set to the end-of-turn marker it was trained to end answers with (TRL's
    trainers end completions and stop generation at EOS)."""
    from tunebook.models import load_tokenizer
    from tunebook.prompts import stop_strings

    tokenizer = copy.deepcopy(load_tokenizer(str(parent), recipe.model.trust_remote_code))
    tokenizer.eos_token = stop_strings(tokenizer, recipe.data.system_prompt)[0]
    return tokenizer


def stage_model(recipe: Recipe, parent: Path) -> Any:
    """Base model + the parent's adapter, trainable. (DPOTrainer adds the frozen copy named `ref` itself and uses
    it as the reference, so the reference is the parent, not the bare base model.)"""
    from peft import PeftModel

    from tunebook.models import load_model, resolve_model_path

    model = load_model(resolve_model_path(recipe.model.name), recipe.model, for_training=True)
    return PeftModel.from_pretrained(model, parent, is_trainable=True)


def stage_config(recipe: Recipe, output_dir: Path, use_cuda: bool, dtype: str | None = None) -> Any:
    """The recipe's `dpo:`/`grpo:` section on top of tunebook's defaults, as TRL's DPOConfig/GRPOConfig."""
    from tunebook.config import trainer_config_class
    from tunebook.precision import mixed_precision_flags, resolve

    kwargs = dict(STAGE_DEFAULTS)
    kwargs.update({k: v for k, v in recipe.training.items() if k != "resume_from_checkpoint"})
    mixed_precision_flags(kwargs, dtype or resolve(recipe.model.dtype).dtype, use_cuda)
    kwargs["use_cpu"] = not use_cuda
    kwargs.setdefault("seed", recipe.seed)
    if recipe.method == "dpo":
        kwargs["max_length"] = recipe.data.max_length  # prompt + answer, as in SFT (data.max_length)
    return trainer_config_class(recipe.method)(output_dir=str(output_dir), **kwargs)


def stage_prompts(recipe: Recipe, rows: list[dict], tokenizer: Any, answer_tokens: int) -> dict[int, int]:
    """`stage.prompts` training rows, a seeded choice, as {row index: prompt tokens}: only prompts that leave room
    for an answer of `answer_tokens` within `data.max_length`, as SFT drops its rows longer than that. TRL's DPO
    would cut a longer pair's answers (`truncation_mode: keep_start`) or drop the pair after its prompt had been
    sampled for nothing, and the longest schemas cost the most to sample: each of a prompt's `stage.samples` rows
    holds its own copy of the prompt's key/value cache (8 rows of 2,000-token Spider schemas took the SQL stage's
    sampling to 14 GB; docs/stages.md)."""
    from tunebook.prompts import encode_prompt

    wanted = min(len(rows), recipe.stage.prompts or len(rows))
    limit = recipe.data.max_length
    room = None if limit is None else limit - answer_tokens
    chosen: dict[int, int] = {}
    passed_over = 0
    for index in random.Random(recipe.seed).sample(range(len(rows)), len(rows)):
        if len(chosen) == wanted:
            break
        length = len(encode_prompt(tokenizer, rows[index], recipe.data.system_prompt))
        if room is not None and length > room:
            passed_over += 1
            continue
        chosen[index] = length
    if not chosen:
        raise RecipeError(recipe.source, "data.max_length", f"no training prompt leaves room for an answer of "
                          f"{answer_tokens} tokens within data.max_length={limit}.",
                          "Raise data.max_length, or allow shorter answers.")
    if passed_over:
        print(f"prompts: {passed_over} passed over: with an answer of {answer_tokens} tokens they exceed "
              f"data.max_length={limit}")
    return chosen


def grpo_prompts(recipe: Recipe, rows: list[dict], tokenizer: Any) -> list[dict]:
    """GRPO's training rows: the rendered prompt and the fields the rewards read."""
    from tunebook.prompts import render_prompt
    from tunebook.rewards import reward_columns

    data_file = Path(recipe.data.train)
    return [{"prompt": render_prompt(tokenizer, row, recipe.data.system_prompt), **reward_columns(row, data_file)}
            for row in rows]


def train_stage(run: Run, rows: list[dict], resume: Path | None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Train a DPO or GRPO stage; return (trainer, tokenizer, model, facts for run_info)."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed

    from tunebook.progress import RichProgress
    from tunebook.runs import fingerprint_callback
    from tunebook.speedups import preference_prompts_shared, score_trained_positions_only

    recipe = run.recipe
    parent = check_parent(recipe)
    set_seed(recipe.seed)
    use_cuda = torch.cuda.is_available()
    tokenizer = stage_tokenizer(parent, recipe)
    refuse_special_markers(rows, recipe.data.train, tokenizer)
    args = stage_config(recipe, run.checkpoints_dir, use_cuda)  # TRL's own checks, before any sampling or model
    facts: dict[str, Any] = {"parent": {"recipe": recipe.stage.parent, "adapter": str(parent)}}
    score_trained_positions_only()  # the answers' positions only: DPO's prompts are ~90% of its tokens
    if recipe.method == "dpo":
        from trl import DPOTrainer

        from tunebook.pairs import preference_pairs

        pairs, facts["pairs"] = preference_pairs(run, rows, parent, tokenizer)
        if not pairs:
            raise RecipeError(recipe.source, "stage", "no preference pair could be made: the parent's samples were "
                              "all judged equal.", "Raise stage.samples or stage.prompts, or give preference rows.")
        model = stage_model(recipe, parent)
        with preference_prompts_shared() as shared:  # the reference is scored while the trainer is built
            trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                 processing_class=tokenizer,
                                 callbacks=[RichProgress(), fingerprint_callback(run.fingerprint)])
        facts.update(shared)
    else:
        from trl import GRPOTrainer

        from tunebook.rewards import load_reward

        rewards = [load_reward(name, recipe.source) for name in recipe.stage.rewards]
        chosen = stage_prompts(recipe, rows, tokenizer, args.max_completion_length or 0)
        prompts = grpo_prompts(recipe, [rows[i] for i in chosen], tokenizer)
        facts["prompts"] = len(prompts)
        model = stage_model(recipe, parent)
        trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=Dataset.from_list(prompts),
                              processing_class=tokenizer, callbacks=[RichProgress(), fingerprint_callback(run.fingerprint)])
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer, tokenizer, model, facts
