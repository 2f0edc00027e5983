"""Every recipe parses and validates; GPU recipes' LoRA targets attach to a tiny model of their architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from tunebook.config import load_recipe
from tunebook.models import REGISTRY, architecture_config, tiny_config
from tunebook.runs import lora_settings
from tunebook.validate import validate_recipe

RECIPES = sorted(Path("recipes").glob("*.yaml")) or sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path, all_data):
    recipe = load_recipe(path)
    report = validate_recipe(recipe)
    assert recipe.name == path.stem
    assert set(lora_settings(recipe)["target_modules"]) <= set(report.linear_modules)
    assert all(len(rows) > 0 for rows in report.splits.values())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_targets_attach_to_tiny_model(path):
    """LoRA on a tiny random model of the recipe's config class wraps every named target module."""
    from peft import LoraConfig, get_peft_model

    recipe = load_recipe(path)
    config = tiny_config(architecture_config(recipe.model.name))
    model = transformers.AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_settings(recipe)))
    wrapped = {name.split(".")[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(lora_settings(recipe)["target_modules"])


def test_recipes_cover_the_gpu_architectures():
    names = {load_recipe(p).model.name for p in RECIPES}
    assert {"smollm2-135m-instruct", "phi3-mini-4k-instruct", "mistral-7b-instruct", "llama3-8b-instruct"} <= names
    stems = {p.stem for p in RECIPES}
    assert {f"{m}-{t}" for m in ("smollm2", "phi3", "mistral", "llama3") for t in ("sql", "review", "qa", "summarize")} <= stems
    gpu = [load_recipe(p) for p in RECIPES if not load_recipe(p).model.name.startswith("smollm2")]
    assert all(r.model.quantization == "4bit" for r in gpu), "GPU recipes default to QLoRA"
    assert all(REGISTRY[r.model.name].hub_id for r in gpu)
    phi3 = [r for r in gpu if r.model.name.startswith("phi3")]
    assert all("qkv_proj" in lora_settings(r)["target_modules"] for r in phi3)


def test_recipe_by_stem_and_overrides():
    recipe = load_recipe("smollm2-sql", ["training.learning_rate=1e-4", "lora.r=32", "eval.limit=5"])
    assert recipe.training["learning_rate"] == pytest.approx(1e-4)
    assert recipe.lora["r"] == 32
    assert recipe.eval.limit == 5
