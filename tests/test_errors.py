"""Each bad input gives a clear error naming file, field and fix — before any model loads."""

from __future__ import annotations

import json

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
    assert "still missing: data.val (" in message and "nope.jsonl)" in message and "data.train" not in message
    assert "tunebook data sql" in message and '{"messages": [' in message


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
    recipe = load_recipe(tiny_recipe(), ["task=poetry", "eval.metrics=[]"])  # any name: generic defaults
    assert recipe.eval.metrics == ["rouge", "bleu", "chrf", "exact_match", "perplexity"]
    assert recipe.eval.main_metric == "rougeL"
    with pytest.raises(RecipeError, match="task: 'my task!' is not a task name"):
        load_recipe(tiny_recipe(), ["task=my task!"])
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


# ---------------------------------------------------------------- each reproduced stack trace is now one line


def test_override_that_is_not_yaml(tiny_recipe):
    with pytest.raises(RecipeError) as info:
        load_recipe(tiny_recipe(), ["lora.r=[1"])
    assert "lora.r: the override value '[1' is not valid YAML" in str(info.value)


def test_unknown_dataset_for_data_command(capsys):
    assert main(["data", "poetry"]) == 2
    err = capsys.readouterr().err
    assert "no dataset builder for 'poetry'" in err and "sql, review, qa, summarize" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("field", ["output", "instruction"])
def test_null_fields_in_a_row(tiny_recipe, tmp_path, field):
    bad = tmp_path / "nulls.jsonl"
    row = {"instruction": "a", "input": "x", "output": "b", field: None}
    bad.write_text('{"instruction": "a", "output": "b"}\n' + json.dumps(row) + "\n")
    message = error_for(tiny_recipe(data__train=str(bad)))
    assert f"nulls.jsonl: line 2: field '{field}': is null" in message


def test_model_name_that_is_nowhere(tiny_recipe, tmp_path):
    message = error_for(tiny_recipe(), ["model.name=/nonexistent"])
    assert "model.name: '/nonexistent' is not a registry model, a local model directory or a Hub id" in message
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert "directory without config.json" in error_for(tiny_recipe(), [f"model.name={empty}"])


def test_library_choices_and_counts_are_checked(tiny_recipe):
    message = error_for(tiny_recipe(), ["training.lr_scheduler_type=foo"])
    assert "training.lr_scheduler_type: 'foo' is not one of trl.SFTConfig's choices" in message
    assert "cosine" in message
    assert "Did you mean 'cosine'?" in error_for(tiny_recipe(), ["training.lr_scheduler_type=cosin"])
    assert "eval.batch_size: 0 is too small" in error_for(tiny_recipe(), ["eval.batch_size=0"])
    assert "eval.max_new_tokens: -1 is too small" in error_for(tiny_recipe(), ["eval.max_new_tokens=-1"])
    message = error_for(tiny_recipe(), ["export.gguf=[f16, q4_km]"])
    assert "export.gguf: 'q4_km' is not a GGUF type" in message and "Did you mean 'q4_k_m'?" in message


def test_eval_and_export_validate_first(tiny_recipe, tmp_path):
    from tunebook.evaluate import evaluate
    from tunebook.export import export

    bad = tmp_path / "bad-test.jsonl"
    bad.write_text('{"instruction": null, "output": "b"}\n')
    recipe = load_recipe(tiny_recipe(data__test=str(bad)))
    for command in (lambda: evaluate(recipe, which="base"), lambda: export(recipe)):
        with pytest.raises(RecipeError, match="field 'instruction': is null"):
            command()


def test_incomplete_adapter(tiny_recipe, tmp_path):
    import torch
    from safetensors.torch import save_file

    from tunebook.evaluate import evaluate
    from tunebook.outputs import fine_tuned_dir

    recipe = load_recipe(tiny_recipe())
    adapter = fine_tuned_dir(recipe.name)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    save_file({"w": torch.zeros(64, 64)}, adapter / "adapter_model.safetensors")
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(RecipeError) as info:
        evaluate(recipe)
    assert "adapter_model.safetensors: is truncated or corrupt" in str(info.value)
    assert f"tunebook train {recipe.command_name} --force" in str(info.value)
    (adapter / "adapter_config.json").write_text('{"r": ')
    with pytest.raises(RecipeError, match="adapter_config.json: is not valid JSON"):
        evaluate(recipe)


def test_gold_sql_that_fails_in_user_data_is_found_before_generation(tiny_recipe, tmp_path, sql_data):
    from tunebook.data import read_split
    from tunebook.evaluate import evaluate

    row = read_split(sql_data / "test.jsonl")[0]
    own = tmp_path / "mine.jsonl"
    rows = [{**row, "db_path": str((sql_data / "databases" / f"{row['db_id']}.sqlite").resolve())}]
    rows.append({**rows[0], "output": "SELECT nope FROM nowhere"})
    own.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(RecipeError) as info:
        evaluate(load_recipe(tiny_recipe()), which="base", data=str(own))
    assert "mine.jsonl: example 2: field 'output': the gold SQL fails" in str(info.value)
    assert "no such table: nowhere" in str(info.value)


def test_overrides_may_follow_options(tiny_recipe, capsys):
    assert main(["eval", str(tiny_recipe()), "--model", "base", "eval.batch_size=0"]) == 2
    assert "eval.batch_size: 0 is too small" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_recipe()), "--model", "base", "--nope"])


def test_data_where_selects_train_and_val_rows_and_names_what_is_wrong(tiny_recipe, sql_data):
    report = validate_recipe(load_recipe(tiny_recipe(data__where={"source": ["generated", "chinook"]})))
    assert report.splits["train"] and {r["source"] for r in report.splits["train"]} <= {"generated", "chinook"}
    assert len(report.splits["test"]) == 24, "the test split is never filtered"
    message = error_for(tiny_recipe(data__where={"sorce": "spider"}))
    assert "data.where.sorce" in message and "has a field 'sorce'" in message
    message = error_for(tiny_recipe(data__where={"source": ["nowhere"]}))
    assert "data.where.source" in message and "Its rows have source:" in message
    message = error_for(tiny_recipe(data__where=["source"]))
    assert "data.where" in message and "expected dict" in message


def test_data_repeat_shows_rows_more_often_and_names_what_is_wrong(tiny_recipe, sql_data):
    from tunebook.data import repeat_rows

    recipe = load_recipe(tiny_recipe(data__repeat={"source": {"spider": 3}}))
    rows = validate_recipe(recipe).splits["train"]
    repeated = repeat_rows(rows, recipe.data.repeat)
    spider = sum(r["source"] == "spider" for r in rows)
    assert spider and len(repeated) == len(rows) + 2 * spider
    assert [r for r in repeated if r["source"] != "spider"] == [r for r in rows if r["source"] != "spider"]
    first = next(i for i, r in enumerate(repeated) if r["source"] == "spider")
    assert repeated[first:first + 3] == [repeated[first]] * 3
    message = error_for(tiny_recipe(data__repeat={"source": {"chinok": 2}}))
    assert "data.repeat.source.chinok" in message and "Its rows have source:" in message
    message = error_for(tiny_recipe(data__repeat={"source": {"chinook": 0}}))
    assert "data.repeat.source.chinook" in message and "whole number" in message
    message = error_for(tiny_recipe(data__repeat={"source": 2}))
    assert "data.repeat.source" in message


def test_eval_where_is_checked_before_generation(tiny_recipe):
    from tunebook.evaluate import evaluate, load_eval_rows

    recipe = load_recipe(tiny_recipe(eval__where={"source": "generated"}, eval__limit=None))
    rows, _ = load_eval_rows(recipe, None)
    assert rows and {r["source"] for r in rows} == {"generated"}
    recipe = load_recipe(tiny_recipe(eval__where={"sourse": "spider"}))
    with pytest.raises(RecipeError, match=r"eval\.where\.sourse: no row of .*test\.jsonl has a field 'sourse'"):
        evaluate(recipe, which="base")


@pytest.mark.parametrize("override, field, words", [
    ("lora.r=0", "lora.r", "not a rank"),
    ("lora.target_modules=[]", "lora.target_modules", "train nothing"),
    ("lora.target_modules=q_proj", "lora.target_modules", "matches none of them"),
    ("lora.lora_dropout=1.5", "lora.lora_dropout", "not a dropout probability"),
    ("lora.layers_to_transform=[]", "lora.layers_to_transform", "not a layer index or a list of them"),
    ("lora.layers_to_transform=[-1]", "lora.layers_to_transform", "not a layer index or a list of them"),
    ("lora.layers_to_transform=[0, 40]", "lora.layers_to_transform", "40 is not a layer of"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size", "whole number >= 1"),
    ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps", "whole number >= 1"),
    ("training.learning_rate=-1e-4", "training.learning_rate", "must be positive"),
    ("training.eval_strategy=steps", "training.eval_strategy", "data.val_limit is 0"),
    ("export.gguf=[iq2_xxs]", "export.gguf", "needs an importance matrix"),
    ("export.gguf=[q2_k_s]", "export.gguf", "needs an importance matrix"),
    ("export.verify_prompts=0", "export.verify_prompts", "too small"),
    ("training.report_to=wandbb", "training", "TRL refuses these settings: wandbb is not supported"),
])
def test_late_failures_are_validate_time_errors(tiny_recipe, override, field, words):
    overrides = [override, "data.val_limit=0"] if "eval_strategy" in override else [override]
    message = error_for(tiny_recipe(), overrides)
    assert f"{field}:" in message and words in message, message


def test_a_regex_target_that_matches_layers_is_accepted(tiny_recipe):
    validate_recipe(load_recipe(tiny_recipe(), ["lora.target_modules=.*(q|v)_proj"]))


def test_recipe_names_must_be_folder_names(tmp_path, tiny_recipe):
    bad = tmp_path / "..yaml"
    bad.write_text(tiny_recipe().read_text())
    with pytest.raises(RecipeError, match=r"'\.' is not a recipe name"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="is not a recipe name or a .yaml path"):
        load_recipe("../../etc/passwd")
    from tunebook.runs import check_label

    with pytest.raises(RecipeError, match="'a/b' is not a run name"):
        check_label("a/b")


def test_files_that_are_not_utf8_name_the_file_and_line(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    broken = tmp_path / "latin1.yaml"
    broken.write_bytes(recipe.read_bytes().replace(b"You write SQLite queries.", b"Caf\xe9 queries."))
    with pytest.raises(RecipeError) as info:
        load_recipe(broken)
    assert str(info.value).startswith(f"{broken}: line ") and "is not UTF-8 (byte 0xe9)" in str(info.value)
    rows = (tmp_path / "train.jsonl").read_bytes().splitlines()
    (tmp_path / "train.jsonl").write_bytes(b"\n".join([rows[0], rows[1].replace(b"Schema", b"Sch\xe9ma"), *rows[2:]]))
    message = error_for(recipe)
    assert "train.jsonl: line 2: is not UTF-8" in message


def test_secrets_never_reach_outputs_and_remote_code_is_noted(tiny_recipe, monkeypatch):
    import yaml as yaml_lib

    recipe = load_recipe(tiny_recipe(), ["training.hub_token=hf_secret123", "model.trust_remote_code=true"])
    assert "hf_secret123" not in yaml_lib.safe_dump(recipe.to_dict())
    from tunebook.config import redacted_overrides

    assert redacted_overrides(recipe.overrides) == ["training.hub_token=<redacted>", "model.trust_remote_code=true"]
    notes = validate_recipe(recipe).notes
    assert any("trust_remote_code is on" in n for n in notes) and any("HF_TOKEN" in n for n in notes)


def test_a_key_written_twice_is_refused_with_both_lines(tiny_recipe):
    path = tiny_recipe()
    text = path.read_text()
    path.write_text(text + "training:\n  max_steps: 5\n")  # a second section would replace the first whole
    message = error_for(path)
    assert f"{path.name}: line {text.count(chr(10)) + 1}: repeats 'training' (first on line" in message
    assert "Merge the two" in message


def test_an_override_keeps_its_text_whole(tiny_recipe):
    recipe = load_recipe(tiny_recipe(), ["data.system_prompt=Answer briefly #no-fluff, in French",
                                         "data.val_limit=4"])
    assert recipe.data.system_prompt == "Answer briefly #no-fluff, in French"
    assert recipe.data.val_limit == 4


def test_eval_selection_fields_are_checked_against_the_test_rows(tiny_recipe):
    message = error_for(tiny_recipe(), ["eval.limit=2", "eval.limit_per=sourse"])
    assert "eval.limit_per: no row of" in message and "Did you mean 'source'?" in message
    message = error_for(tiny_recipe(), ["eval.where={sourse: [spider]}"])
    assert "eval.where.sourse: no row of" in message


def test_a_special_token_written_in_a_row_is_refused_before_training(tiny_recipe, tmp_path):
    from tunebook.train import train

    recipe = tiny_recipe()
    train_file = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in train_file.read_text().splitlines()]
    rows[2]["output"] = rows[2]["output"] + " -- ends with <|im_end|> here"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecipeError) as info:
        train(load_recipe(recipe))
    assert str(info.value).startswith(f"{train_file}: line 3: field 'output': contains '<|im_end|>'")


@pytest.mark.parametrize("override, words", [
    ("training.max_steps='5.5'", "'5.5' is a str, expected int"),
    ("training.learning_rate=.nan", "nan is not a finite number"),
    ("training.learning_rate=inf", "inf is not a finite number"),
    ("eval.metrics=[[rouge]]", "'['rouge']' is not a metric. Did you mean 'rouge'?"),
])
def test_numbers_and_names_that_only_look_right_are_refused(tiny_recipe, override, words):
    message = error_for(tiny_recipe(), [override])
    assert words in message, message


def test_paths_beside_a_recipe_elsewhere_and_fields_given_twice_are_named(tiny_recipe, tmp_path, monkeypatch):
    path = tiny_recipe()
    elsewhere = tmp_path / "project"
    elsewhere.mkdir()
    for split in ("train", "val", "test"):
        (elsewhere / f"{split}.jsonl").write_text((tmp_path / f"{split}.jsonl").read_text())
    moved = elsewhere / "mine.yaml"
    moved.write_text(path.read_text().replace(str(tmp_path / "train.jsonl"), "train.jsonl")
                     .replace(str(tmp_path / "val.jsonl"), "val.jsonl").replace(str(tmp_path / "test.jsonl"), "test.jsonl"))
    monkeypatch.chdir(tmp_path / "databases")
    message = error_for(moved)
    assert "they are beside the recipe, in" in message and "paths are read from the current directory" in message
    line = (tmp_path / "train.jsonl").read_text().splitlines()[0]
    (tmp_path / "train.jsonl").write_text(line[:-1] + ', "output": "SELECT 1"}\n')
    assert "train.jsonl: line 1: field 'output': is given twice in one object" in error_for(path)


def test_a_system_prompt_that_would_break_the_modelfile_is_refused(tiny_recipe):
    message = error_for(tiny_recipe(), ['data.system_prompt=Answer as in """docs""" here'])
    assert 'data.system_prompt: contains """, which would end the SYSTEM' in message
