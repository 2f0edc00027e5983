"""Your own task: any task name, instruction or chat rows, metrics the recipe chooses, and a scaffolded recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import read_json, write_recipe

from tunebook.cli import main
from tunebook.config import load_recipe
from tunebook.data import read_split
from tunebook.errors import RecipeError
from tunebook.prompts import encode_example, encode_prompt, render_messages
from tunebook.validate import validate_recipe

WORDS = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("water", "eau"), ("bread", "pain"),
         ("tree", "arbre"), ("sun", "soleil"), ("moon", "lune"), ("book", "livre"), ("car", "voiture"),
         ("apple", "pomme"), ("road", "route")]


def instruction_rows() -> list[dict]:
    return [{"instruction": "Translate the English word to French, as JSON.", "input": en,
             "output": json.dumps({"fr": fr})} for en, fr in WORDS]


def chat_rows() -> list[dict]:
    """Two-turn conversations: the answer scored is the last assistant turn."""
    rows = []
    for (en, fr), (en2, fr2) in zip(WORDS, WORDS[1:] + WORDS[:1], strict=True):
        rows.append({"messages": [
            {"role": "system", "content": "You translate English words to French, as JSON."},
            {"role": "user", "content": en}, {"role": "assistant", "content": json.dumps({"fr": fr})},
            {"role": "user", "content": en2}, {"role": "assistant", "content": json.dumps({"fr": fr2})}]})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def own_task(tmp_path, tiny_model_dir, monkeypatch):
    """A copy of smollm2-qa renamed to task `translate` with its own data in the given format."""
    import tunebook.outputs

    monkeypatch.setattr(tunebook.outputs, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    monkeypatch.setattr(tunebook.outputs, "LOGS_DIR", tmp_path / "logs")

    def build(rows: list[dict], **eval_overrides) -> Path:
        data = {split: str(write_rows(tmp_path / f"{split}.jsonl", rows)) for split in ("train", "val", "test")}
        template = load_recipe("smollm2-qa").to_dict()
        return write_recipe(
            tmp_path / "tiny-translate.yaml",
            model={"name": str(tiny_model_dir), "dtype": "float32"}, task="translate",
            data={**data, "max_length": 128, "val_limit": 4},
            lora={**template["lora"], "r": 4, "lora_alpha": 8},
            training={**template["training"], "max_steps": 2, "save_steps": 2, "report_to": "none"},
            eval={"metrics": ["json_match", "exact_match", "chrf", "perplexity"], "max_new_tokens": 12,
                  "batch_size": 4, "limit": 6, **eval_overrides},
            export={"gguf": ["f16"]})

    return build


@pytest.mark.parametrize("rows", [instruction_rows, chat_rows], ids=["instruction", "chat"])
def test_a_new_task_validates_trains_evaluates_and_exports(own_task, rows):
    import tunebook.export
    from tunebook.evaluate import evaluate
    from tunebook.export import export
    from tunebook.outputs import gguf_dir
    from tunebook.train import train

    recipe = load_recipe(own_task(rows()))
    assert recipe.task == "translate" and recipe.eval.main_metric == "json_match"
    validate_recipe(recipe)
    train(recipe)
    report = read_json(evaluate(recipe) / "report.json")
    assert report["main_metric"] == "json_match" and report["metrics"] == recipe.eval.metrics
    for kind in ("base", "fine_tuned"):
        assert list(report[kind]) == ["json_match", "json_valid", "exact_match", "chrf", "perplexity"]
    expected = [r["output"] if "output" in r else r["messages"][-1]["content"] for r in rows()[:3]]
    assert [e["reference"] for e in report["examples"][:3]] == expected
    if tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists():
        export(recipe, verify=False)
        modelfile = (gguf_dir(recipe.name) / "Modelfile").read_text()
        assert "FROM ./tiny-translate-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def test_multi_turn_loss_covers_every_assistant_turn_and_its_end_marker(tokenizer):
    row = chat_rows()[0]
    item = encode_example(tokenizer, row)
    text = tokenizer.decode(item["input_ids"])
    assert text == render_messages(tokenizer, row["messages"]).rstrip()
    trained = [t if label != -100 else None for t, label in zip(item["input_ids"], item["labels"], strict=True)]
    runs, current = [], []
    for token in trained + [None]:
        if token is None and current:
            runs.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    assert runs == ['{"fr": "chat"}<|im_end|>', '{"fr": "chien"}<|im_end|>']
    # Evaluation asks for the last answer from exactly the tokens training saw before it.
    prompt = encode_prompt(tokenizer, row)
    assert item["input_ids"][:len(prompt)] == prompt
    last_only = encode_example(tokenizer, row, all_turns=False)
    assert tokenizer.decode([t for t in last_only["labels"] if t != -100]) == '{"fr": "chien"}<|im_end|>'


def test_multi_turn_in_the_plain_format_without_a_chat_template(tokenizer):
    plain = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    item = encode_example(plain, chat_rows()[0])
    trained = plain.decode([t for t in item["labels"] if t != -100])
    assert trained == '{"fr": "chat"}' + plain.eos_token + '{"fr": "chien"}' + plain.eos_token
    assert "### Instruction:\ndog\n\n### Response:\n" in plain.decode(item["input_ids"])


def error_for(recipe_path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        validate_recipe(load_recipe(recipe_path, overrides or []))
    return str(info.value)


def test_bad_chat_data_is_named_by_file_line_and_fix(own_task, tmp_path):
    good = chat_rows()
    cases = {
        "mixed": (good[:2] + instruction_rows()[:1], "line 3", "is a instruction row, but line 1 is a chat row"),
        "no answer last": ([good[0], {"messages": good[1]["messages"][:-1]}], "line 2: field 'messages'",
                           "ends with a user turn, not an assistant turn"),
        "unknown role": ([{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
                         "line 1: messages[1]: role", "'human' is not a role"),
        "empty turn": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
                       "line 1: messages[2]: content", "is empty"),
        "system later": ([{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"},
                                        {"role": "assistant", "content": "x"}]}], "line 1: messages[2]: role", "system turn"),
        "two user turns": ([{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "x"}]}],
                           "line 1: messages[3]: role", "is user where an assistant turn belongs"),
        "answer first": ([{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "y"}]}],
                         "line 1: messages[1]: role", "is assistant where a user turn belongs"),
    }
    recipe = own_task(good)
    for name, (rows, where, problem) in cases.items():
        write_rows(tmp_path / "train.jsonl", rows)
        message = error_for(recipe)
        assert f"train.jsonl: {where}" in message and problem in message, name


def test_bad_metric_choices_are_errors_before_any_model_loads(own_task, tmp_path):
    recipe = own_task(instruction_rows())
    message = error_for(recipe, ["eval.metrics=[json_mtch]"])
    assert "eval.metrics: 'json_mtch' is not a metric. Did you mean 'json_match'?" in message
    message = error_for(recipe, ["eval.main_metric=rouge"])
    assert "eval.main_metric: 'rouge' is not a column" in message and "rouge1" not in message
    message = error_for(recipe, ["eval.metrics=[exact_match, sql_execution]"])
    assert "'exact_match' and 'sql_execution' both write the column 'exact_match'" in message
    # sql_execution needs a database for every row: named by file and line at validate time.
    message = error_for(recipe, ["eval.metrics=[sql_execution]"])
    assert "test.jsonl: line 1: has neither 'db_id' nor 'db_path', which eval.metrics 'sql_execution' needs" in message
    # json_match needs JSON references.
    prose = write_rows(tmp_path / "prose.jsonl", [*instruction_rows()[:2], {**instruction_rows()[2], "output": "le pain"}])
    message = error_for(recipe, [f"data.test={prose}"])
    assert "prose.jsonl: line 3: has a reference answer that is not JSON, which eval.metrics 'json_match'" in message


def test_splits_as_json_parquet_and_csv_read_like_jsonl(tmp_path):
    from datasets import Dataset

    rows = instruction_rows()
    (tmp_path / "s.json").write_text(json.dumps(rows))
    Dataset.from_list(rows).to_parquet(str(tmp_path / "s.parquet"))
    Dataset.from_list(rows).to_csv(str(tmp_path / "s.csv"), index=False)
    jsonl = read_split(write_rows(tmp_path / "s.jsonl", rows))
    for suffix in ("json", "parquet", "csv"):
        assert read_split(tmp_path / f"s.{suffix}") == jsonl, suffix
    chats = chat_rows()
    Dataset.from_list(chats).to_parquet(str(tmp_path / "c.parquet"))
    assert read_split(tmp_path / "c.parquet") == chats
    (tmp_path / "bad.json").write_text(json.dumps({"rows": rows}))
    with pytest.raises(RecipeError, match="is not a JSON list"):
        read_split(tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="is not a split tunebook reads"):
        read_split(write_rows(tmp_path / "s.txt", rows))


def test_json_match_compares_values_not_text():
    from tunebook.metrics import json_metrics

    scores = json_metrics(['{"b": 2, "a": [1, 2.0]}', '```json\n{"a": [1, 2], "b": 2}\n```', '{"a": [2, 1], "b": 2}',
                           "not json"], ['{"a": [1, 2], "b": 2}'] * 4)
    assert scores == {"json_match": 50.0, "json_valid": 75.0}


def test_new_scaffolds_a_recipe_and_validate_says_what_is_missing(tmp_path, monkeypatch, capsys, tiny_model_dir):
    import tunebook.scaffold

    template = Path("recipes/smollm2-qa.yaml").resolve()
    monkeypatch.setattr(tunebook.scaffold, "RECIPES_DIR", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    assert main(["new", "smollm2-translate", "--from", str(template), "--task", "translate"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "data/translate/train.jsonl" in out and "tunebook validate smollm2-translate" in out
    path = tmp_path / "recipes" / "smollm2-translate.yaml"
    recipe = load_recipe(path, [f"model.name={tiny_model_dir}"])
    assert recipe.task == "translate" and recipe.data.train == "data/translate/train.jsonl"
    assert recipe.data.system_prompt is None and recipe.eval.main_metric == "rougeL"
    assert recipe.training == load_recipe(template).training
    assert "any of: exact_match, rouge" in path.read_text()
    message = error_for(path, [f"model.name={tiny_model_dir}"])
    assert "still missing: data.train (data/translate/train.jsonl), data.val" in message and '{"messages"' in message
    (tmp_path / "data" / "translate").mkdir(parents=True)
    for split in ("train", "val", "test"):
        write_rows(tmp_path / "data" / "translate" / f"{split}.jsonl", chat_rows())
    assert validate_recipe(recipe).splits["test"] == chat_rows()
    assert main(["new", "smollm2-translate", "--from", str(template), "--task", "translate"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_new_leaves_the_templates_own_data_settings_behind(tmp_path, monkeypatch, capsys):
    import tunebook.scaffold

    monkeypatch.setattr(tunebook.scaffold, "RECIPES_DIR", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    sql = Path(__file__).resolve().parents[1] / "recipes"
    # block-style values of keys that belong to the template's data (`where:` over several lines) go whole
    block = tmp_path / "block.yaml"
    block.write_text((sql / "smollm2-sql.yaml").read_text().replace(
        "  where: {source: [spider, chinook]}", "  where:\n    source:\n      - spider\n      - chinook"))
    assert main(["new", "mine", "--from", str(block), "--task", "translate"]) == 0
    recipe = load_recipe(tmp_path / "recipes" / "mine.yaml")
    assert recipe.data.where is None and recipe.data.share_context is None
    assert recipe.eval.decoding == ["plain"] and recipe.eval.limit_per is None
    assert main(["new", "mine-dpo", "--from", str(sql / "smollm2-sql-dpo.yaml"), "--task", "translate"]) == 2
    assert "--from: smollm2-sql-dpo is a dpo stage" in capsys.readouterr().err


def test_built_in_tasks_keep_their_metrics_and_headlines():
    headline = {"smollm2-sql": "exec_accuracy", "smollm2-review": "code_fixed", "smollm2-qa": "rougeL",
                "smollm2-summarize": "rougeL", "smollm2-extract": "json_match"}
    for name, main_metric in headline.items():
        recipe = load_recipe(name)
        assert recipe.eval.main_metric == main_metric and "perplexity" in recipe.eval.metrics, name
    assert load_recipe("smollm2-sql").eval.metrics == ["sql_execution", "perplexity"]
    assert load_recipe("smollm2-review").eval.metrics[0] == "code_fixed"


def schema_rows() -> list[dict]:
    """Five questions on each of two schemas, and one row that shares nothing."""
    rows = [{"instruction": "Write SQL.", "input": f"Schema:\nCREATE TABLE {db} (a INTEGER);\n\nQuestion: q{i} on {db}?",
             "output": f"SELECT {i} FROM {db}", "db_id": db, "shape": "select" if i % 2 else "count"}
            for db in ("x", "y") for i in range(5)]
    return rows + [{"instruction": "Write SQL.", "input": "Question: alone?", "output": "SELECT 0", "db_id": "z"}]


def test_share_context_reads_a_schema_once_for_several_questions():
    from tunebook.data import share_context

    rows = schema_rows()
    out = share_context(rows, "db_id", turns=2, fits=lambda messages: True, seed=1)
    conversations = [r for r in out if "messages" in r]
    assert len(conversations) == 4 and len(out) == 7, "5 questions per schema in 2 + 2 + 1; the lone row stays"
    pairs = []
    for row in out:
        if "messages" not in row:
            pairs.append((row["input"].split("\n\n")[-1], row["output"]))
            continue
        turns = row["messages"]
        assert turns[0]["content"].startswith("Write SQL.\n\nSchema:\nCREATE TABLE"), "the first turn has it all"
        assert turns[2]["content"].startswith("Question: q") and "CREATE" not in turns[2]["content"]
        assert row["db_id"] in ("x", "y") and "shape" not in row or row["shape"] in ("select", "count")
        pairs += [(turns[i]["content"].split("\n\n")[-1], turns[i + 1]["content"]) for i in range(0, len(turns), 2)]
    assert sorted(pairs) == sorted((r["input"].split("\n\n")[-1], r["output"]) for r in rows), "every answer, once"
    assert out == share_context(rows, "db_id", 2, lambda m: True, seed=1), "deterministic for a seed"
    # A conversation grows only while it fits: with room for one question, every row stays as it was.
    alone = share_context(rows, "db_id", 4, fits=lambda messages: len(messages) <= 2, seed=1)
    assert sorted(map(json.dumps, alone)) == sorted(map(json.dumps, rows))


def test_share_context_trains_several_questions_per_schema(tiny_recipe, capsys, tmp_path, sql_data):
    rows = [json.loads(line) for line in (sql_data / "train.jsonl").read_text().splitlines()]
    by_db: dict[str, list[dict]] = {}
    for row in rows:
        by_db.setdefault(row["db_id"], []).append(row)
    pairs = [r for group in by_db.values() if len(group) >= 2 for r in group[:2]][:24]  # 12 schemas, 2 questions
    train_file = tmp_path / "shared-train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    recipe = load_recipe(tiny_recipe(name="tiny-shared", data__share_context={"by": "db_id", "turns": 2},
                                     data__train=str(train_file), training__max_steps=2))
    from tunebook.train import train

    out = train(recipe)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data.share_context:"))
    answers, conversations = [int(w) for w in line.split() if w.isdigit()][:2]
    assert answers == 24 and conversations < answers, line
    info = json.loads((out / "run_info.json").read_text())
    assert info["fingerprint"]["data.share_context"] == {"by": "db_id", "turns": 2}
    assert info["examples"]["train"] <= conversations and info["global_steps"] == 2


def test_share_context_is_checked_before_any_model_loads(own_task, tmp_path):
    recipe = own_task(schema_rows())
    assert "exactly the keys `by` and `turns`" in error_for(recipe, ["data.share_context={by: db_id}"])
    assert "data.share_context.turns: 1 is not a whole number >= 2" in error_for(
        recipe, ["data.share_context={by: db_id, turns: 1}"])
    message = error_for(recipe, ["data.share_context={by: database, turns: 4}"])
    assert "data.share_context.by: no instruction row of" in message and "db_id" in message
    validate_recipe(load_recipe(recipe, ["data.share_context={by: db_id, turns: 4}", "eval.metrics=[exact_match]",
                                         "eval.main_metric=exact_match"]))


def test_csv_cells_and_bom_files_are_read_as_written(tmp_path):
    # pandas would read None/null/NA/an empty cell as missing (the input dropped) and 42 as a number (refused)
    (tmp_path / "t.csv").write_text('instruction,input,output\nSay it,None,Aucun\nSay it,NA,"N/A"\nCount,,42\n',
                                    encoding="utf-8-sig")
    assert read_split(tmp_path / "t.csv") == [
        {"instruction": "Say it", "input": "None", "output": "Aucun"},
        {"instruction": "Say it", "input": "NA", "output": "N/A"},
        {"instruction": "Count", "input": "", "output": "42"}]
    rows = instruction_rows()[:2]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    assert read_split(tmp_path / "b.jsonl") == read_split(tmp_path / "b.json") == rows
