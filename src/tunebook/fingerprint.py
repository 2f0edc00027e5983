"""A run's identity: what decides its training trajectory, so a checkpoint is resumed only by the same run.

Every checkpoint and every finished adapter carries the fingerprint of the run that wrote it. Everything in
the recipe that changes which examples are seen, how they are tokenised, the model, the adapter or the
optimisation is part of it; the fields below only change how often the run logs, saves or evaluates, and are
the one list of what may change between a run and its resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tunebook.config import Recipe
from tunebook.data import sha256

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


def library_defaults(cls: type) -> dict[str, Any]:
    """Field -> default of a library config dataclass (fields without a plain default are left out)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def run_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """The flat mapping `section.field -> value` that identifies a training run.

    A `lora`/`training` value equal to the library's default is left out, so writing a default explicitly
    (`seed: 42`) is the same run as leaving it unset.
    """
    from peft import LoraConfig
    from trl import SFTConfig

    lora_defaults, sft_defaults = library_defaults(LoraConfig), library_defaults(SFTConfig)
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
    out.update({f"training.{k}": v for k, v in recipe.training.items()
                if k not in ignored and not same(v, sft_defaults.get(k, Ellipsis))})
    return json.loads(json.dumps(out, sort_keys=True, default=str))  # plain JSON values, comparable after a reload


def same(value: Any, default: Any) -> bool:
    """A recipe value equals a library default (enums compare by their value)."""
    if default is Ellipsis:
        return False
    default = getattr(default, "value", default)
    return value == default or (isinstance(value, list) and isinstance(default, (list, tuple, set))
                                and list(value) == list(default))


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
    except (json.JSONDecodeError, OSError):
        return None


def write_fingerprint(folder: Path, fingerprint: dict[str, Any]) -> None:
    """Written last into a checkpoint: its presence marks the checkpoint complete."""
    tmp = folder / f".{FINGERPRINT_FILE}.tmp"
    tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    tmp.replace(folder / FINGERPRINT_FILE)
