"""`tunebook bench --gpu`: tunebook's QLoRA training against what a user writes without it, per seed model.

Each seed model is its real architecture and size with random weights (`gpu_check.random_qlora_model`: no weights
can be downloaded here), trained for one epoch over the same random rows of varied length (the last quarter of
each row is its answer) by:

- **plain**: `transformers.Trainer` + PEFT QLoRA, each batch padded to its longest row, loss on the answer only;
- **tunebook**: `trl.SFTTrainer` with the recipe's `training:` section as tunebook builds it (`train.sft_config`:
  BFD packing, padding-free, the recipe's batch, accumulation and checkpointing);
- the speed options TRL exposes, each on top of tunebook's run where it is installed: `use_liger_kernel`
  (liger-kernel) and FlashAttention-2 (flash-attn); otherwise recorded as not installed.

Tokens/s counts real tokens (no padding) over the epoch's training time; peak memory is the GPU's, beside
`tunebook plan`'s estimate for the same batch and length. `--tiny` runs the same code on tiny configs on any
machine (the tests run it on the CPU), so it cannot rot between GPU sessions.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from tunebook.gpu_check import CHECK_RECIPES, random_qlora_model


def random_rows(vocab_size: int, max_length: int, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` tokenised rows of 1/4 to all of `max_length` tokens, the loss on each row's last quarter."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(max(4, max_length // 4), max_length)
        ids = [rng.randrange(3, vocab_size) for _ in range(length)]
        answer = max(1, length // 4)
        rows.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return rows


def qlora_model(recipe: Any, tiny: bool, device: str, attn: str | None = None) -> Any:
    """A fresh random QLoRA model of the recipe's architecture with the recipe's LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tunebook.models import architecture_config, tiny_config

    config = architecture_config(recipe.model.name)
    if tiny:
        config = tiny_config(config)
    torch.manual_seed(0)
    model = random_qlora_model(config, device, torch.bfloat16)
    if attn:
        model.set_attn_implementation(attn)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.lora))


def one_run(name: str, recipe: Any, rows: list[dict], tiny: bool, device: str, extra: dict[str, Any]) -> dict:
    """One epoch over `rows`: real tokens/s, peak GPU memory and the final loss."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTTrainer

    from tunebook.bench import padded_collator
    from tunebook.models import load_tokenizer, resolve_model_path
    from tunebook.train import sft_config

    use_cuda = device == "cuda"
    attn = extra.pop("attn_implementation", None)
    model = qlora_model(recipe, tiny, device, attn)
    # Rows are token ids already; SFTTrainer wants a tokenizer for its pad id, and the embedded one is at hand.
    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    batch = recipe.training.get("per_device_train_batch_size", 8)
    accumulation = recipe.training.get("gradient_accumulation_steps", 1)
    with tempfile.TemporaryDirectory() as out:
        common = {"num_train_epochs": 1, "max_steps": -1, "save_strategy": "no", "eval_strategy": "no",
                  "report_to": "none", "logging_steps": 1000, "disable_tqdm": True, "use_cpu": not use_cuda,
                  "bf16": True, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
                  "dataloader_num_workers": 0, "seed": 0}
        if name == "plain":
            args = TrainingArguments(output_dir=out, learning_rate=recipe.training.get("learning_rate", 2e-4),
                                     **{**common, **_checkpointing(True)})
            trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              data_collator=padded_collator(tokenizer.pad_token_id))
        else:
            training = {k: v for k, v in recipe.training.items() if k not in ("max_steps", "save_steps")}
            run_recipe = dataclasses.replace(recipe, training={**training, **common, **extra})
            args = sft_config(run_recipe, Path(out), use_cuda)
            trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer)
        if use_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = trainer.train()
        if use_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        steps = trainer.state.global_step
    tokens = sum(len(r["input_ids"]) for r in rows)
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None
    del trainer, model
    if use_cuda:
        torch.cuda.empty_cache()
    return {"run": name, "optimizer_steps": steps, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "peak_gib": round(peak, 2) if peak is not None else None,
            "train_loss": round(result.training_loss, 4)}


def _checkpointing(on: bool) -> dict[str, Any]:
    """The checkpointing flag under the name the installed transformers reads (renamed in 5.2x)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def options() -> dict[str, dict[str, Any] | str]:
    """TRL's speed options to try on top of tunebook's run: settings, or why one is skipped."""
    import torch

    found: dict[str, dict[str, Any] | str] = {}
    found["liger"] = ({"use_liger_kernel": True} if importlib.util.find_spec("liger_kernel")
                      else "not installed (pip install liger-kernel)")
    flash = importlib.util.find_spec("flash_attn") and torch.cuda.is_available()
    found["flash_attention_2"] = ({"attn_implementation": "flash_attention_2"} if flash
                                  else "not installed (pip install flash-attn) or no CUDA")
    return found


def bench_gpu(recipes: tuple[str, ...] = CHECK_RECIPES, tiny: bool = False, steps: int = 6) -> dict[str, Any]:
    """Every seed recipe: plain vs tunebook vs each available option, the ratio to plain, and plan's estimate."""
    import torch

    from tunebook.config import load_recipe
    from tunebook.models import architecture_config, tiny_config
    from tunebook.plan import GIB, estimate, shapes

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "tiny": tiny,
                           "models": []}
    for name in recipes:
        recipe = load_recipe(name)
        config = architecture_config(recipe.model.name)
        if tiny:
            config = tiny_config(config)
        max_length = 64 if tiny else recipe.data.max_length
        batch = recipe.training.get("per_device_train_batch_size", 8)
        accumulation = recipe.training.get("gradient_accumulation_steps", 1)
        rows = random_rows(config.vocab_size, max_length, batch * accumulation * steps)
        runs = [one_run("plain", recipe, rows, tiny, device, {}), one_run("tunebook", recipe, rows, tiny, device, {})]
        skipped = {}
        for option, settings in options().items():
            if isinstance(settings, str):
                skipped[option] = settings
            else:
                runs.append(one_run(f"tunebook+{option}", recipe, rows, tiny, device, dict(settings)))
        plain = runs[0]["tokens_per_s"]
        for run in runs:
            run["vs_plain"] = round(run["tokens_per_s"] / plain, 2)
        s = shapes(config, list(recipe.lora["target_modules"]), int(recipe.lora.get("r", 8)))
        out["models"].append({"recipe": name, "model": recipe.model.name, "rows": len(rows),
                              "max_length": max_length, "batch": batch, "accumulation": accumulation,
                              "plan_gib": round(estimate(s, "4bit", "bfloat16", batch, max_length,
                                                         checkpointing=True).total / GIB, 2),
                              "runs": runs, "skipped": skipped})
        print(f"{name}: " + ", ".join(f"{r['run']} {r['tokens_per_s']} tokens/s ({r['vs_plain']}x)" for r in runs),
              flush=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    """The GPU bench as a table: one row per model and run."""
    lines = [f"Device: {result['device']}{' (tiny configs: a smoke run, not a measurement)' if result['tiny'] else ''}.",
             "", "| model | run | tokens/s | vs plain | peak GiB | plan GiB |", "|---|---|---:|---:|---:|---:|"]
    for model in result["models"]:
        for run in model["runs"]:
            lines.append(f"| {model['model']} | {run['run']} | {run['tokens_per_s']} | {run['vs_plain']}x | "
                         f"{run['peak_gib'] if run['peak_gib'] is not None else '–'} | {model['plan_gib']} |")
        for option, why in model["skipped"].items():
            lines.append(f"| {model['model']} | tunebook+{option} | skipped: {why} | | | |")
    return "\n".join(lines) + "\n"
