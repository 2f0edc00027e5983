"""`tunebook train`: a thin wrapper around `trl.SFTTrainer` with PEFT LoRA/QLoRA/DoRA."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tunebook import allocator
from tunebook.config import Recipe, redacted_overrides
from tunebook.data import refuse_special_markers, repeat_rows, sha256, share_context
from tunebook.errors import RecipeError
from tunebook.models import load_model, load_tokenizer, resolve_model_path
from tunebook.outputs import RUN_INFO_FILE, atomic_dir, clean_leftovers, is_main_process
from tunebook.precision import as_dict, mixed_precision_flags, resolve
from tunebook.prompts import encode_example, is_chat
from tunebook.runs import (
    Run,
    fingerprint_callback,
    finished_run,
    identify,
    plan_resume,
    refuse_to_replace_other_run,
    run_lock,
)
from tunebook.speedups import register_packed_attention, score_trained_positions_only
from tunebook.validate import validate_recipe

# SFTConfig defaults tunebook picks; any of them can be set in the recipe's `training:` section.
TRAINING_DEFAULTS: dict[str, Any] = {
    "logging_steps": 5,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
    "eval_strategy": "no",
    "report_to": ["tensorboard"],
    "include_num_input_tokens_seen": "non_padding",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,  # RichProgress replaces the tqdm bar
    # Every LoRA weight takes part in every forward pass; DDP's search for unused ones costs a graph walk per step
    # (and a warning per process), and transformers only turns it off by itself for a bare PreTrainedModel.
    "ddp_find_unused_parameters": False,
}


def encode_split(tokenizer: Any, rows: list[dict], recipe: Recipe, limit: int | None) -> tuple[list[dict], int]:
    """Token ids + labels for each row; rows longer than `data.max_length` are dropped and counted."""
    encoded, dropped = [], 0
    for row in rows[:limit] if limit is not None else rows:  # val_limit: 0 means no validation
        item = encode_example(tokenizer, row, recipe.data.system_prompt, recipe.data.max_length)
        if item is None:
            dropped += 1
        else:
            encoded.append(item)
    return encoded, dropped


def conversations_sharing_context(rows: list[dict], recipe: Recipe, tokenizer: Any) -> list[dict]:
    """`data.share_context`: training rows grouped into conversations that fit `data.max_length`."""
    by, turns = recipe.data.share_context["by"], recipe.data.share_context["turns"]

    def fits(messages: list[dict]) -> bool:
        return encode_example(tokenizer, {"messages": messages}, recipe.data.system_prompt,
                              recipe.data.max_length) is not None

    grouped = share_context(rows, by, turns, fits, recipe.seed)
    if is_main_process():
        answers = sum(sum(m["role"] == "assistant" for m in r["messages"]) if is_chat(r) else 1 for r in grouped)
        print(f"data.share_context: {answers} training answers in {len(grouped)} conversations "
              f"(up to {turns} questions per shared {by})")
    return grouped


def sft_config(recipe: Recipe, output_dir: Path, use_cuda: bool, dtype: str | None = None):
    """The recipe's `training:` section on top of tunebook's defaults, as a `trl.SFTConfig` (`dtype`: the model's,
    resolved here when not given)."""
    from trl import SFTConfig

    kwargs = dict(TRAINING_DEFAULTS)
    kwargs.update({k: v for k, v in recipe.training.items() if k != "resume_from_checkpoint"})
    mixed_precision_flags(kwargs, dtype or resolve(recipe.model.dtype).dtype, use_cuda)
    if kwargs.get("eval_strategy") != "no":
        kwargs.setdefault("eval_steps", kwargs["save_steps"])
    # Eval loss needs no logits kept, and batches no larger than training's keep its memory within training's
    # (transformers' default of 8 padded rows held ~0.5 GB of full-vocabulary logits for smollm2-sql).
    kwargs.setdefault("per_device_eval_batch_size", kwargs.get("per_device_train_batch_size", 8))
    kwargs.setdefault("prediction_loss_only", True)
    kwargs["use_cpu"] = not use_cuda
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing*; TRL 1.x still sets the old
    # name (default True), which prints a deprecation warning on every run. Pass the resolved setting under the
    # name the installed transformers reads; recipes may use either name.
    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if new in fields and new not in kwargs:
            kwargs[new] = kwargs.pop(old, fields[old].default)
            kwargs[old] = None
    return SFTConfig(
        output_dir=str(output_dir),
        max_length=recipe.data.max_length,
        **kwargs,
    )


def train(recipe: Recipe, force: bool = False, force_resume: bool = False) -> Path:
    """Train the run's adapter and write it, atomically, to models/fine-tuned/<run>/ (see runs.py for names).

    `force` starts from scratch even when this run finished or has checkpoints, and replaces a finished
    adapter of another run under this name; `force_resume` continues a checkpoint whose recipe or data differ.
    """
    report = validate_recipe(recipe)
    run = identify(recipe)
    with run_lock(run.name, f"train {run.command}"):
        out = train_run(run, report, force, force_resume)
    leave_process_group()
    return out


def leave_process_group() -> None:
    """Under `accelerate launch`: wait until every process is done (the main one writes the adapter), then close
    the group. A process that exits with its gloo group open can abort at exit ("terminate called without an
    active exception", pytorch/pytorch#190489): one two-process CPU run in about ten did. Only after a run that
    succeeded: a process that failed must not wait in a barrier its peers never reach."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_run(run: Run, report: Any, force: bool, force_resume: bool) -> Path:
    """`train` once the run holds its lock."""
    recipe = run.recipe
    if is_main_process():
        for note in clean_leftovers(run.adapter_dir):
            print(note)
        if run.name != recipe.name:
            why = "" if recipe.run_label else f" (its overrides change the run {recipe.source} describes)"
            print(f"run {run.name}: outputs go to {run.adapter_dir}{why}")
    done = finished_run(run) if not force else None
    if done is not None:
        print(f"already trained: {done} was written by this recipe with the same data and settings; "
              f"nothing to do (`tunebook train {run.command} --force` retrains)")
        return done
    if not (force or force_resume):
        refuse_to_replace_other_run(run)
    resume = plan_resume(run, force, force_resume)

    if recipe.method != "sft":
        return train_stage_run(run, report, resume)
    return train_sft(run, report, resume)


def training_sets(run: Run, report: Any, tokenizer: Any) -> tuple[list[dict], list[dict], int]:
    """The tokenised training and validation examples (dropped-for-length counted) of an SFT run."""
    recipe = run.recipe
    for split in ("train", "val"):
        refuse_special_markers(report.splits[split], getattr(recipe.data, split), tokenizer)
    train_rows, val_rows = repeat_rows(report.splits["train"], recipe.data.repeat), report.splits["val"]
    if recipe.data.share_context:
        train_rows = conversations_sharing_context(train_rows, recipe, tokenizer)
    train_set, dropped_train = encode_split(tokenizer, train_rows, recipe, recipe.data.train_limit)
    val_set, dropped_val = encode_split(tokenizer, val_rows, recipe, recipe.data.val_limit)
    if not train_set:
        raise RecipeError(recipe.source, "data.max_length", f"every training example is longer than "
                          f"{recipe.data.max_length} tokens.", "Raise data.max_length.")
    if not val_set and str(recipe.training.get("eval_strategy", "no")) != "no":
        raise RecipeError(recipe.source, "training.eval_strategy", f"every validation example is longer than "
                          f"{recipe.data.max_length} tokens, so there is nothing to evaluate during training.",
                          "Raise data.max_length, or set training.eval_strategy: 'no'.")
    if dropped_train or dropped_val:
        print(f"note: dropped {dropped_train} train / {dropped_val} val examples longer than "
              f"data.max_length={recipe.data.max_length} tokens (not truncated: that would cut answers)")
    return train_set, val_set, dropped_train + dropped_val


def lora_model(run: Run, args: Any, use_cuda: bool) -> Any:
    """The base model with a fresh LoRA adapter, prepared for the run's precision, quantisation and packing."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    recipe = run.recipe
    model = load_model(resolve_model_path(recipe.model.name), recipe.model, for_training=True)
    if (args.packing or args.padding_free) and not use_cuda and not recipe.model.attn_implementation:
        model.set_attn_implementation(register_packed_attention())  # one packed example at a time (speedups.py)
    if recipe.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(args.gradient_checkpointing))
    # SFTTrainer would create the LoRA weights before Trainer seeds; seeding here makes them reproducible.
    set_seed(recipe.seed)
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **recipe.lora))


def train_sft(run: Run, report: Any, resume: Path | None) -> Path:
    """`trl.SFTTrainer` on the run's tokenised examples; the adapter and run_info written whole."""
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, set_seed
    from trl import SFTTrainer

    from tunebook.progress import RichProgress

    recipe = run.recipe
    started = time.perf_counter()
    use_cuda = torch.cuda.is_available()
    set_seed(recipe.seed)
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name), recipe.model.trust_remote_code)
    train_set, val_set, dropped = training_sets(run, report, tokenizer)
    # Built before the model so k-bit preparation follows the resolved checkpointing setting: TRL's default,
    # or the recipe's `gradient_checkpointing` / `activation_checkpointing` (its transformers 5.2x name).
    args = sft_config(recipe, run.checkpoints_dir, use_cuda)
    # The eval loss before training is taken inside the training loop, after accelerate has wrapped the model:
    # `trainer.evaluate()` before `train()` prepares the bare model for evaluation, and since accelerate 1.14
    # (`_is_accelerate_prepared`) training's prepare then returns it as is, without DistributedDataParallel, so
    # every process trained on its own gradients (found by tests/test_scale.py).
    if "eval_on_start" not in recipe.training:
        args.eval_on_start = bool(val_set) and resume is None
    model = lora_model(run, args, use_cuda)
    score_trained_positions_only()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_set),
                         eval_dataset=Dataset.from_list(val_set) if val_set else None, processing_class=tokenizer,
                         callbacks=[RichProgress(), fingerprint_callback(run.fingerprint)])
    trainer.remove_callback(PrinterCallback)  # RichProgress shows the logs
    effective = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
    if is_main_process():
        print(f"effective batch {effective} = {args.world_size} processes x {args.per_device_train_batch_size} per "
              f"device x {args.gradient_accumulation_steps} accumulation ({distributed_type()})")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    first_eval = next((h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == 0), {})
    train_seconds = result.metrics["train_runtime"] - first_eval.get("eval_runtime", 0.0)  # training, not that eval
    eval_after = trainer.evaluate()["eval_loss"] if val_set else None
    # Under ZeRO-3/FSDP each process holds a shard of the weights: gathering the full state is collective (every
    # process takes part), and only then does the main process write the adapter from it.
    sharded = distributed_type() in ("DEEPSPEED", "FSDP")
    full_state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    if not trainer.is_world_process_zero():
        return run.adapter_dir
    run_info = describe_run(run, trainer, model, resume, train_seconds, time.perf_counter() - started, use_cuda, {
        "examples": {"train": len(train_set), "val": len(val_set), "dropped_too_long": dropped},
        "effective_batch": effective, "train_loss": result.training_loss,
        "eval_loss_before": first_eval.get("eval_loss"), "eval_loss_after": eval_after})
    return write_final(run, trainer, tokenizer, run_info, full_state)


def train_stage_run(run: Run, report: Any, resume: Path | None) -> Path:
    """A DPO or GRPO stage (stages.py) from its parent's adapter; the adapter and run_info written whole."""
    import torch

    from tunebook.stages import train_stage

    started = time.perf_counter()
    trainer, _, model, facts = train_stage(run, report.splits["train"], resume)
    if not trainer.is_world_process_zero():
        return run.adapter_dir
    seconds = next((h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h), 0.0)
    run_info = describe_run(run, trainer, model, resume, seconds, time.perf_counter() - started,
                            torch.cuda.is_available(), {"method": run.recipe.method, **facts})
    parent = load_tokenizer(facts["parent"]["adapter"], run.recipe.model.trust_remote_code)
    return write_final(run, trainer, parent, run_info, adapters=["default"])


def describe_run(run: Run, trainer: Any, model: Any, resume: Path | None, train_seconds: float, wall: float,
                 use_cuda: bool, extra: dict[str, Any]) -> dict[str, Any]:
    """run_info.json: what ran, on what, how long, and the run's fingerprint."""
    import torch

    recipe, state = run.recipe, trainer.state
    tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    device = ("cuda:" + torch.cuda.get_device_name(0) if use_cuda
              else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {
        "recipe": recipe.name, "run": run.name, "overrides": redacted_overrides(recipe.overrides),
        "model": recipe.model.name, "model_path": resolve_model_path(recipe.model.name), "seed": recipe.seed,
        "dtype": as_dict(resolve(recipe.model.dtype)), "git_sha": git_sha(), "versions": versions(), "device": device,
        "data": {split: {"path": getattr(recipe.data, split), "sha256": sha256(getattr(recipe.data, split))}
                 for split in ("train", "val", "test")},
        "world_size": trainer.args.world_size, "tier": distributed_type(), "global_steps": state.global_step,
        "resumed_from": str(resume) if resume else None, "train_runtime_s": round(train_seconds, 1),
        "wall_time_s": round(wall, 1), "tokens_seen": tokens,
        "train_tokens_per_s": round(tokens / train_seconds, 1) if tokens and train_seconds else None,
        "peak_memory_mb": peak_memory_mb(use_cuda), "allocator": allocator.as_dict(allocator.in_use()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **extra, "fingerprint": run.fingerprint,
    }


def distributed_type() -> str:
    """How this run is spread: accelerate's distributed type (NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, FSDP …)."""
    from accelerate import PartialState

    return str(PartialState().distributed_type).rsplit(".", 1)[-1]


def write_final(run: Run, trainer: Any, tokenizer: Any, run_info: dict[str, Any],
                full_state: dict[str, Any] | None = None, adapters: list[str] | None = None) -> Path:
    """Adapter, tokenizer, resolved recipe, run_info, loss log and curve: built in a temp dir, then renamed.

    `adapters`: which of the model's adapters to save (a DPO stage also carries its frozen reference, `ref`)."""
    final = run.adapter_dir
    with atomic_dir(final) as tmp:
        # PEFT picks the adapter's weights out of a gathered full state dict (None: the model's own, unsharded).
        trainer.model.save_pretrained(tmp, safe_serialization=True, state_dict=full_state,
                                      selected_adapters=adapters)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(run.recipe.to_dict(), sort_keys=False))
        (tmp / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=2))
        history = trainer.state.log_history
        (tmp / "loss_log.json").write_text(json.dumps(history, indent=2))
        plot_loss(history, tmp / "loss_curve.png", run.name)
    return final


def plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def peak_memory_mb(use_cuda: bool) -> float:
    if use_cuda:
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    # VmHWM is this process image's own peak. ru_maxrss is not: Linux carries it over an exec, so a run started
    # by a large parent (`tunebook bench` after its eval part) reported the parent's peak as its own.
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def git_sha() -> str | None:
    """The commit of the tunebook code that runs (asked where the package lives, not in the working directory,
    which may be another checkout), with "-dirty" when that checkout has uncommitted changes; None outside git."""
    here = str(Path(__file__).resolve().parent)
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def versions() -> dict[str, str]:
    out = {}
    for name in ("tunebook", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out
