"""`tunebook validate`: everything that can be checked before a model loads."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

from tunebook.config import Recipe
from tunebook.data import read_jsonl
from tunebook.errors import RecipeError
from tunebook.models import architecture_config, linear_module_names


@dataclass
class ValidationReport:
    """What validation found: the splits it read and notes worth showing the user."""

    splits: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    linear_modules: list[str] = field(default_factory=list)


def check_target_modules(recipe: Recipe, report: ValidationReport) -> None:
    """Every LoRA target must name a linear layer of the architecture (Phi-3 fuses qkv_proj and gate_up_proj)."""
    targets = recipe.lora.get("target_modules")
    config = architecture_config(recipe.model.name)
    if config is None:
        report.notes.append(f"architecture of '{recipe.model.name}' is not known offline; target modules not checked")
        return
    modules = linear_module_names(config)
    report.linear_modules = sorted(modules)
    if targets is None or targets == "all-linear" or isinstance(targets, str):
        return  # PEFT's own defaults, or a regex PEFT matches against full names
    missing = [t for t in targets if t not in modules]
    if missing:
        arch = type(config).__name__.replace("Config", "")
        raise RecipeError(
            recipe.source, "lora.target_modules",
            f"{', '.join(map(repr, missing))} match no layer of the {arch} architecture "
            f"(its linear layers: {', '.join(sorted(modules))}).",
            "Use names from that list, or 'all-linear'.",
        )


def check_tier(recipe: Recipe, report: ValidationReport) -> None:
    """Settings the machine must support: quantisation needs bitsandbytes; fp16/bf16 notes on CPU."""
    import torch

    if recipe.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(
            recipe.source, "model.quantization", f"'{recipe.model.quantization}' needs bitsandbytes.",
            "Install it (`pip install bitsandbytes`) or set model.quantization: none.",
        )
    if not torch.cuda.is_available() and recipe.model.dtype != "float32":
        report.notes.append(
            f"no GPU here: model.dtype={recipe.model.dtype} on CPU is much slower than float32 on CPUs without "
            "AMX (override with model.dtype=float32)"
        )


def validate_recipe(recipe: Recipe, check_model: bool = True) -> ValidationReport:
    """Read and check every split, the LoRA targets and the tier; raise RecipeError on the first problem."""
    report = ValidationReport()
    for split in ("train", "val", "test"):
        report.splits[split] = read_jsonl(getattr(recipe.data, split), recipe.source, f"data.{split}")
    if check_model:
        check_target_modules(recipe, report)
        check_tier(recipe, report)
    return report
