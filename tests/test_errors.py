"""Each bad input gives a clear error naming file, field and fix — before any model loads."""

from __future__ import annotations

import pytest
import transformers

from tunebook.cli import main
from tunebook.config import load_recipe
from tunebook.errors import RecipeError
from tunebook.validate import validate_recipe


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def error_for(recipe_path, overrides=()):
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_recipe(recipe_path, list(overrides)))
    return str(info.value)


def test_valid_tiny_recipe_passes(tiny_recipe):
    report = validate_recipe(load_recipe(tiny_recipe()))
    assert len(report.splits["train"]) == 24


def test_unknown_key_suggests_the_right_one(tiny_recipe):
    message = error_for(tiny_recipe(), ["training.learnin_rate=1e-4"])
    assert "training.learnin_rate" in message and "Did you mean 'learning_rate'?" in message
    message = error_for(tiny_recipe(), ["data.max_lenght=12"])
    assert "data.max_lenght: unknown key" in message and "'max_length'" in message
    assert "tiny-sql.yaml" in message


def test_wrong_type(tiny_recipe):
    message = error_for(tiny_recipe(), ["lora.r=sixteen"])
    assert "lora.r" in message and "'sixteen' is a str, expected int" in message


def test_numbers_written_as_yaml_strings_are_accepted(tiny_recipe):
    recipe = load_recipe(tiny_recipe(), ["training.learning_rate='2e-4'"])
    assert recipe.training["learning_rate"] == pytest.approx(2e-4)


def test_missing_data_file(tiny_recipe, tmp_path):
    message = error_for(tiny_recipe(data__val=str(tmp_path / "nope.jsonl")))
    assert "data.val" in message and "nope.jsonl' does not exist" in message and "make data" in message


def test_malformed_jsonl_line(tiny_recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    message = error_for(tiny_recipe(data__train=str(bad)))
    assert "bad.jsonl: line 2" in message and "not valid JSON" in message


def test_missing_field(tiny_recipe, tmp_path):
    bad = tmp_path / "nofield.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "input": "x"}\n')
    message = error_for(tiny_recipe(data__test=str(bad)))
    assert "nofield.jsonl: line 2: field 'output': is missing" in message


def test_empty_split(tiny_recipe, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    message = error_for(tiny_recipe(data__val=str(empty)))
    assert "data.val" in message and "has no examples" in message


def test_target_modules_missing_from_architecture(tiny_recipe):
    message = error_for("phi3-sql", ["lora.target_modules=[q_proj, v_proj]"])
    assert "lora.target_modules" in message and "'q_proj', 'v_proj' match no layer of the Phi3" in message
    assert "qkv_proj" in message and "gate_up_proj" in message


def test_unknown_task_and_choice(tiny_recipe):
    with pytest.raises(RecipeError, match="task: 'poetry' is not a task"):
        load_recipe(tiny_recipe(), ["task=poetry"])
    with pytest.raises(RecipeError, match="model.quantization: '3bit' is not allowed"):
        load_recipe(tiny_recipe(), ["model.quantization=3bit"])


def test_tunebook_owned_training_keys(tiny_recipe):
    with pytest.raises(RecipeError, match="training.max_length: is set by tunebook. Remove it: set `data.max_length`"):
        load_recipe(tiny_recipe(), ["training.max_length=64"])


def test_cli_exits_nonzero_with_message(tiny_recipe, capsys):
    assert main(["validate", str(tiny_recipe()), "lora.rr=4"]) == 2
    err = capsys.readouterr().err
    assert "lora.rr: is not a field of peft.LoraConfig. Did you mean 'r'?" in err
    assert main(["validate", "smollm2-sqll"]) == 2
    assert "Did you mean 'smollm2-sql'?" in capsys.readouterr().err
