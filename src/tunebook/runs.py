"""Run identity: what a run is, where its outputs live, who may write them, and when a checkpoint is resumed.

A run is a recipe with the overrides it was started with. Its **fingerprint** is everything that decides the
training trajectory (model, data, adapter, optimisation); its **name** says where its outputs live:

- the recipe's stem (`smollm2-sql`) when the run is the recipe as written;
- `<stem>@<label>` with `--name LABEL`;
- `<stem>@<8 hex digits of the fingerprint>` when overrides change the fingerprint
  (`tunebook train smollm2-sql training.max_steps=10` never touches the recipe's own adapter, and
  `tunebook eval smollm2-sql training.max_steps=10` finds that run again).

Every checkpoint and every finished adapter carries its run's fingerprint, so a checkpoint is resumed only by
the same run, and eval, export and the app can tell whether the adapter they load is the recipe's. One process
at a time writes a run's outputs (`run_lock`); a second gets an error naming the first's pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunebook import outputs
from tunebook.config import NAME_RULE, Recipe, load_recipe
from tunebook.data import sha256
from tunebook.errors import RecipeError
from tunebook.outputs import ADAPTER_WEIGHTS, RUN_INFO_FILE

FINGERPRINT_FILE = "tunebook_fingerprint.json"

# `training:` fields that do not change the trajectory: changing them between runs still resumes.
NOT_IN_FINGERPRINT = frozenset({
    "resume_from_checkpoint",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_dir", "logging_nan_inf_filter",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "save_safetensors",
    "eval_steps", "eval_strategy", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
    "report_to", "run_name", "disable_tqdm", "include_num_input_tokens_seen", "dataloader_num_workers",
    "ddp_find_unused_parameters", "ddp_timeout", "ddp_backend",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
})
# `data:` fields that decide which training examples exist and how they become tokens.
DATA_FIELDS = ("max_length", "system_prompt", "train_limit")
# With `load_best_model_at_end`, evaluation decides which weights are final: then these count too.
BEST_MODEL_FIELDS = ("eval_strategy", "eval_steps", "save_steps", "save_strategy", "metric_for_best_model",
                     "greater_is_better")


# ---------------------------------------------------------------- the fingerprint


def library_defaults(cls: type) -> dict[str, Any]:
    """Field -> default of a library config dataclass (fields without a plain default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


# Stage fields added after stage runs were first written, with their defaults: in a fingerprint only when set,
# so the runs trained before they existed still match.
STAGE_FIELDS_IF_SET = {"repair": False}


def run_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The flat mapping `section.field -> value` that identifies a training run.

    A `lora`/`training` value equal to the library's default is left out, so writing a default explicitly
    (`seed: 42`) is the same run as leaving it unset.
    """
    from peft import LoraConfig

    from tunebook.config import METHOD_SECTIONS, trainer_config_class

    lora_defaults, sft_defaults = library_defaults(LoraConfig), library_defaults(trainer_config_class(recipe.method))
    best = bool(recipe.training.get("load_best_model_at_end"))
    ignored = NOT_IN_FINGERPRINT - set(BEST_MODEL_FIELDS) if best else NOT_IN_FINGERPRINT
    out: dict[str, Any] = {f"model.{k}": v for k, v in dataclasses.asdict(recipe.model).items()}
    out["data.train (sha256)"] = sha256(recipe.data.train)
    out.update({f"data.{k}": getattr(recipe.data, k) for k in DATA_FIELDS})
    if recipe.data.where:  # only when set, so fingerprints written before `where` existed still match
        out["data.where"] = recipe.data.where
    if recipe.data.repeat:
        out["data.repeat"] = recipe.data.repeat
    if recipe.data.share_context:
        out["data.share_context"] = recipe.data.share_context
    if best:
        out["data.val (sha256)"] = sha256(recipe.data.val)
        out["data.val_limit"] = recipe.data.val_limit
    out.update({f"lora.{k}": v for k, v in recipe.lora.items() if not same(v, lora_defaults.get(k, Ellipsis))})
    section = METHOD_SECTIONS[recipe.method]
    out.update({f"{section}.{k}": v for k, v in recipe.training.items()
                if k not in ignored and not same(v, sft_defaults.get(k, Ellipsis))})
    if recipe.method != "sft":  # a stage's trajectory starts at its parent's adapter
        out.update({f"stage.{k}": v for k, v in dataclasses.asdict(recipe.stage).items()
                    if k not in STAGE_FIELDS_IF_SET or v != STAGE_FIELDS_IF_SET[k]})
        parent = parent_adapter_dir(recipe)
        out["stage.parent adapter (sha256)"] = (sha256(parent / ADAPTER_WEIGHTS) if (parent / ADAPTER_WEIGHTS).exists()
                                                else None)
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # plain JSON values, comparable after a reload


def parent_recipe(recipe: Recipe) -> Recipe:
    """The recipe a stage starts from (as its file is written: the parent's own run)."""
    return load_recipe(recipe.stage.parent)


def lora_settings(recipe: Recipe) -> dict[str, Any]:
    """The LoRA settings a recipe's adapter has: its own, or for a stage its parent's (it trains that adapter)."""
    return parent_recipe(recipe).lora if recipe.method != "sft" else recipe.lora


def parent_adapter_dir(recipe: Recipe) -> Path:
    """Where the adapter a stage starts from lives: the parent recipe's run."""
    return identify(parent_recipe(recipe)).adapter_dir


def same(value: Any, default: Any) -> bool:
    """A recipe value equals a library default (enums compare by their value)."""
    if default is Ellipsis:
        return False
    default = getattr(default, "value", default)
    return value == default or (isinstance(value, list) and isinstance(default, (list, tuple, set))
                                and list(value) == list(default))


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def fingerprint_diff(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for every field that differs; unset fields show as `(unset)`."""
    if old is None:
        return ["the checkpoint has no fingerprint (written by an older tunebook or an interrupted save)"]
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            changes.append(f"{key}: {_show(old.get(key, '(unset)'))} -> {_show(new.get(key, '(unset)'))}")
    return changes


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a checksum: the first 12 hex digits say enough
    return str(value)


def read_fingerprint(folder: Path) -> dict[str, Any] | None:
    path = folder / FINGERPRINT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None


def write_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Written last into a checkpoint: its presence marks the checkpoint complete."""
    tmp = folder / f".{FINGERPRINT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    tmp.replace(folder / FINGERPRINT_FILE)


# ---------------------------------------------------------------- the run and its name


@dataclass(frozen=True)
class Run:
    """A recipe with its overrides: its fingerprint and the name its outputs live under."""

    recipe: Recipe
    name: str
    fingerprint: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return outputs.fine_tuned_dir(self.name)

    @property
    def checkpoints_dir(self) -> Path:
        return outputs.checkpoints_dir(self.name)

    @property
    def command(self) -> str:
        """How to name this run on a command line: the recipe, its overrides and its `--name`."""
        recipe = self.recipe
        label = [f"--name {recipe.run_label}"] if recipe.run_label else []
        return " ".join([recipe.command_name, *recipe.overrides, *label])


def identify(recipe: Recipe) -> Run:
    """The run a recipe (with its overrides and `--name`) describes: fingerprint and output name."""
    fingerprint = run_fingerprint(recipe)
    if recipe.run_label:
        return Run(recipe, f"{recipe.name}@{recipe.run_label}", fingerprint)
    if recipe.overrides:
        try:
            as_written = run_fingerprint(load_recipe(recipe.source))
        except RecipeError:  # the file alone does not load: the overrides make it a run of its own
            as_written = None
        if as_written != fingerprint:
            return Run(recipe, f"{recipe.name}@{fingerprint_digest(fingerprint)[:8]}", fingerprint)
    return Run(recipe, recipe.name, fingerprint)


def check_label(label: str | None, where: str = "--name") -> str | None:
    """A `--name` label obeys the recipe name rule (it becomes part of folder names)."""
    if label is not None and not NAME_RULE.fullmatch(label):
        raise RecipeError(where, None, f"'{label}' is not a run name.",
                          "Use letters, digits, '-' and '_' (e.g. --name lr1e-4).")
    return label


def adapter_run_info(adapter_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((adapter_dir / RUN_INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def adapter_mismatch(run: Run, adapter_dir: Path | None = None) -> list[str]:
    """How the adapter in `adapter_dir` (default: the run's) differs from the run: [] when it is this run's."""
    info = adapter_run_info(adapter_dir or run.adapter_dir)
    if info is None or "fingerprint" not in info:
        return ["the adapter has no run_info.json fingerprint (written by an older tunebook, or copied in)"]
    return fingerprint_diff(info["fingerprint"], run.fingerprint)


def check_adapter_is_run(run: Run, adapter_dir: Path, command: str, force: bool) -> list[str]:
    """Refuse an adapter trained by a different run, unless `force`; returns the differences (for the report)."""
    changes = adapter_mismatch(run, adapter_dir)
    if changes and not force:
        raise RecipeError(run.recipe.source, None,
                          f"the adapter in {adapter_dir} was not trained by this run ({'; '.join(changes)}).",
                          f"Train it (`tunebook train {run.command}`), or {command} it as it is with --force "
                          "(the output then records the differences).")
    return changes


# ---------------------------------------------------------------- one writer per run


_held: dict[str, int] = {}


@contextlib.contextmanager
def run_lock(name: str, command: str) -> Iterator[None]:
    """Hold the run's lock while a command writes its outputs; refuse if another live process holds it.

    The lock is an `flock` on `models/.locks/<name>.lock`: the kernel releases it when its process dies, so a
    killed run never leaves it stuck. Only the main process of a multi-process launch takes it; a process may
    take its own lock again (`tunebook demo` runs the stages in one process).
    """
    if not outputs.is_main_process() or name in _held:
        _held[name] = _held.get(name, 0) + 1
        try:
            yield
        finally:
            _held[name] -= 1
            if not _held[name]:
                del _held[name]
        return
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        yield
        return
    path = outputs.lock_file(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _read_holder(path)
        os.close(fd)
        raise RecipeError(
            f"run {name}", None, f"{holder} is writing this run's outputs.",
            "Wait for it to finish, or give this run its own name: add `--name LABEL` (outputs go to "
            f"{name.split('@')[0]}@LABEL).") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%H:%M:%S")}).encode())
    _held[name] = 1
    try:
        yield
    finally:
        del _held[name]
        os.close(fd)  # closing releases the flock


def _read_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} (`tunebook {info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


# ---------------------------------------------------------------- checkpoints and resume


def is_complete_checkpoint(path: Path) -> bool:
    """Trainer state, weights and optimizer all written (the fingerprint, written last, is checked apart)."""
    weights = (path / ADAPTER_WEIGHTS).exists() or (path / "model.safetensors").exists()
    return weights and (path / "trainer_state.json").exists() and (path / "optimizer.pt").exists()


def checkpoint_step(path: Path) -> int | None:
    suffix = path.name.rpartition("-")[2]
    return int(suffix) if path.name.startswith("checkpoint-") and suffix.isdigit() else None


def complete_checkpoints(folder: Path) -> list[Path]:
    """Complete `checkpoint-N` directories in `folder` with their fingerprint, newest first."""
    found = [p for p in folder.glob("checkpoint-*")
             if checkpoint_step(p) is not None and is_complete_checkpoint(p) and read_fingerprint(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def last_complete_checkpoint(folder: Path, fingerprint: dict[str, Any] | None = None) -> Path | None:
    """The newest complete checkpoint in `folder` (of the run with `fingerprint`, when given), or None."""
    for path in complete_checkpoints(folder):
        if fingerprint is None or read_fingerprint(path) == fingerprint:
            return path
    return None


def fingerprint_callback(fingerprint: dict[str, Any]):
    """A Trainer callback that writes the run's fingerprint into each checkpoint after everything else."""
    from transformers import TrainerCallback

    class FingerprintCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                write_fingerprint(Path(args.output_dir) / f"checkpoint-{state.global_step}", fingerprint)

    return FingerprintCallback()


def move_aside(ckpt_dir: Path, keep: set[Path] | None = None) -> Path | None:
    """Move the checkpoints of earlier runs to `<run>.stale-<time>/` beside `ckpt_dir` (never deleted).

    Everything in `ckpt_dir` goes, except the paths in `keep` (the run being resumed).
    """
    keep = keep or set()
    leaving = [p for p in ckpt_dir.iterdir() if p not in keep] if ckpt_dir.is_dir() else []
    if not leaving:
        return None
    stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{outputs.timestamp()}")
    n = 1
    while stale.exists():
        n += 1
        stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{outputs.timestamp()}-{n}")
    if outputs.is_main_process():
        if keep:
            stale.mkdir(parents=True)
            for path in leaving:
                os.replace(path, stale / path.name)
        else:
            os.replace(ckpt_dir, stale)
    return stale


def finished_run(run: Run) -> Path | None:
    """The adapter directory if this very run (same fingerprint) already finished, else None."""
    info = adapter_run_info(run.adapter_dir)
    done = info is not None and info.get("fingerprint") == run.fingerprint and (run.adapter_dir / ADAPTER_WEIGHTS).exists()
    return run.adapter_dir if done else None


def refuse_to_replace_other_run(run: Run) -> None:
    """A finished adapter of a different run under this name is not replaced without `--force`."""
    if not (run.adapter_dir / ADAPTER_WEIGHTS).exists():
        return
    changes = adapter_mismatch(run)
    raise RecipeError(run.recipe.source, None,
                      f"{run.adapter_dir} holds a finished run that this one would replace ({'; '.join(changes)}).",
                      f"Retrain over it with `tunebook train {run.command} --force`, or keep both: add "
                      "`--name LABEL` (outputs go to " f"{run.recipe.name}@LABEL).")


def plan_resume(run: Run, force: bool = False, force_resume: bool = False) -> Path | None:
    """The checkpoint to resume, or None to start fresh; decided before any model loads.

    `auto` resumes the newest complete checkpoint of the same run (same fingerprint). Checkpoints of any
    other run are moved aside, with the changed fields on one line; `force_resume` resumes the newest
    complete checkpoint whatever its fingerprint (also one written before fingerprints existed).
    """
    recipe, fingerprint, ckpt_dir = run.recipe, run.fingerprint, run.checkpoints_dir
    value = None if force else recipe.training.get("resume_from_checkpoint")
    again = f"tunebook train {run.command}"
    main = outputs.is_main_process()
    if value not in (None, "auto"):
        path = Path(str(value))
        if not is_complete_checkpoint(path):
            raise RecipeError(recipe.source, "training.resume_from_checkpoint",
                              f"{path} is not a complete checkpoint (weights, optimizer or trainer state missing).",
                              "Name a complete checkpoint-N directory, or use 'auto'.")
        changes = fingerprint_diff(read_fingerprint(path), fingerprint)
        if changes and not force_resume:
            raise RecipeError(recipe.source, "training.resume_from_checkpoint",
                              f"{path} was written by a different run ({'; '.join(changes)}).",
                              f"Train without it to start fresh, or resume it anyway: `{again} --force-resume`.")
        return path
    found, changes = None, []
    if value == "auto":
        found = last_complete_checkpoint(ckpt_dir, fingerprint)
        if found is None and force_resume:
            candidates = sorted((p for p in ckpt_dir.glob("checkpoint-*")
                                 if checkpoint_step(p) is not None and is_complete_checkpoint(p)),
                                key=checkpoint_step, reverse=True)
            found = candidates[0] if candidates else None
        if found is not None:
            changes = fingerprint_diff(read_fingerprint(found), fingerprint)
            # Only complete checkpoints of the resumed run stay (and TensorBoard's runs/): a later save of this
            # run must not land in a half-written or foreign checkpoint-N, nor rotate another run's away.
            same_run = {p for p in complete_checkpoints(ckpt_dir) if read_fingerprint(p) == read_fingerprint(found)}
            stale = move_aside(ckpt_dir, keep=same_run | {found, ckpt_dir / "runs"})
            if stale is not None and main:
                print(f"moved checkpoints of other runs (or interrupted saves) to {stale}")
            if main:
                print(f"resuming from {found}" + (f" despite changes ({'; '.join(changes)})" if changes else ""))
            return found
        newest = next(iter(complete_checkpoints(ckpt_dir)), None)
        changes = fingerprint_diff(read_fingerprint(newest), fingerprint) if newest is not None else []
        found = newest
    stale = move_aside(ckpt_dir)
    if stale is not None and main:
        why = (f"the recipe changed since {found.name} ({'; '.join(changes)})" if found is not None
               else "--force" if force
               else "training.resume_from_checkpoint is not 'auto'" if value is None
               else "no complete checkpoint of this recipe to resume")
        hint = f"; to continue the old run instead: `{again} --force-resume`" if found is not None else ""
        print(f"starting fresh: {why}; old checkpoints moved to {stale}{hint}")
    return None
