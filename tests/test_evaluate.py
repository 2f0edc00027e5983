"""Evaluation on a tiny model: the report has its documented keys; user data with its own databases."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunebook.outputs
from tunebook.config import load_recipe
from tunebook.data import read_split
from tunebook.errors import RecipeError
from tunebook.evaluate import evaluate
from tunebook.generation import generate
from tunebook.train import train


def test_eval_end_to_end_writes_documented_report(tiny_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    recipe = load_recipe(tiny_recipe(training__max_steps=2))
    with pytest.raises(RecipeError, match="no trained adapter"):
        evaluate(recipe)
    train(recipe)
    out = evaluate(recipe)
    report = json.loads((out / "report.json").read_text())
    assert {"recipe", "task", "n_examples", "base", "fine_tuned", "delta", "timing", "examples"} <= set(report)
    assert report["n_examples"] == 6
    assert {"exec_accuracy", "exact_match", "sql_error_rate", "perplexity"} <= set(report["fine_tuned"])
    for key, value in report["delta"].items():
        assert value == pytest.approx(report["fine_tuned"][key] - report["base"][key])
    assert report["timing"]["base"]["examples_per_s"] > 0
    assert {"prompt", "reference", "base", "fine_tuned"} <= set(report["examples"][0])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and "fine_tuned_prediction" in predictions[0] and "db_id" in predictions[0]
    assert (out / "chart.png").stat().st_size > 1000
    assert "| exec_accuracy |" in (out / "report.md").read_text()
    by_shape = report["by_shape"]
    assert by_shape and sum(entry["n_examples"] for entry in by_shape.values()) == report["n_examples"]
    for entry in by_shape.values():
        assert 0 <= entry["fine_tuned"]["exec_accuracy"] <= 100 and "exec_accuracy" in entry["base"]
    assert "## By shape (exec_accuracy)" in (out / "report.md").read_text()
    for side in ("base", "fine_tuned"):  # every answer is exactly one kind: correct, wrong, or why it fails
        kinds = ("exec_accuracy", "wrong_result", "unknown_table", "unknown_column", "syntax_error", "other_error")
        assert sum(report[side][k] for k in kinds) == pytest.approx(100.0)
    assert "## What kind of answer (percent of rows)" in (out / "report.md").read_text()
    assert "| all rows | fine-tuned |" in (out / "report.md").read_text()

    # eval folds the adapter into the weights for the fine-tuned pass: same answers as the adapter kept apart
    from peft import PeftModel

    from tunebook.outputs import fine_tuned_dir

    rows = read_split(recipe.data.test)[:6]
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned_dir(recipe.name), padding_side="left")
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.name),
                                         fine_tuned_dir(recipe.name)).eval()
    texts = generate(unmerged, tokenizer, rows, recipe.data.system_prompt, recipe.eval.max_new_tokens, 6)
    assert [p["fine_tuned_prediction"] for p in predictions] == texts


def test_a_base_pass_is_reused_by_other_runs_of_the_same_base_model(tiny_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    first, other = (load_recipe(tiny_recipe(name=n, training__max_steps=1, training__seed=s))
                    for n, s in (("tiny-a", 1), ("tiny-b", 2)))
    train(first)
    train(other)

    def base_answers(out):
        return [json.loads(line)["base_prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]

    kept = base_answers(evaluate(first))
    capsys.readouterr()
    out = evaluate(other)
    assert "base: all 6 answers reused from the eval of tiny-a" in capsys.readouterr().out
    assert base_answers(out) == kept
    assert any("answers reused from the eval of tiny-a" in n for n in json.loads((out / "report.json").read_text())["notes"])
    # what was reused is what running the base model again gives
    for kept_pass in (tmp_path / "reports" / ".kept-passes").iterdir():
        kept_pass.unlink()
    again = evaluate(other)
    assert "reused" not in capsys.readouterr().out and base_answers(again) == kept
    # other generation settings: not the same base pass
    evaluate(load_recipe(tiny_recipe(name="tiny-a", training__max_steps=1, training__seed=1, eval__max_new_tokens=8)))
    assert "reused" not in capsys.readouterr().out


def test_eval_on_user_data_with_db_path(tiny_recipe, tmp_path, monkeypatch, sql_data):
    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    row = read_split(sql_data / "test.jsonl")[0]
    own = tmp_path / "mine.jsonl"
    db = (sql_data / "databases" / f"{row['db_id']}.sqlite").resolve()
    own.write_text(json.dumps({"instruction": row["instruction"], "input": row["input"], "output": row["output"],
                               "db_path": str(db)}) + "\n")
    out = evaluate(load_recipe(tiny_recipe()), which="base", data=str(own))
    report = json.loads((out / "report.json").read_text())
    assert report["n_examples"] == 1 and report["fine_tuned"] == {} and "exec_accuracy" in report["base"]


def test_prompts_longer_than_the_models_context_are_counted_in_the_report(tiny_recipe, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    import shutil

    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    short = tmp_path / "short-context"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    recipe = load_recipe(tiny_recipe(), [f"model.name={short}", "eval.limit=3"])
    report = json.loads((evaluate(recipe, which="base") / "report.json").read_text())
    note = next(n for n in report["notes"] if "longer than the model's context of 64 tokens" in n)
    assert note.startswith("3 of 3 prompts, with eval.max_new_tokens=16,")


def test_sql_rows_turn_your_own_database_into_eval_rows_in_the_training_form(tiny_recipe, tmp_path, monkeypatch,
                                                                            capsys):
    import sqlite3

    from tunebook.cli import main

    monkeypatch.setattr(tunebook.outputs, "REPORTS_DIR", tmp_path / "reports")
    db = tmp_path / "shop.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE "order" (id INTEGER PRIMARY KEY, "Customer Name" VARCHAR(40), total DECIMAL(8, 2), placed DATE);
        CREATE TABLE item (order_id INT REFERENCES "order", sku TEXT, qty INTEGER, PRIMARY KEY (order_id, sku));
        INSERT INTO "order" VALUES (1, 'Ann', 9.5, '2024-01-02'), (2, 'Bo', 20, '2024-02-03');
        INSERT INTO item VALUES (1, 'a', 2), (2, 'b', 1);
    """)
    con.commit()
    con.close()
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "How many orders are there?", "sql": 'SELECT count(*) FROM "order"',
                                     "shape": "count"}) + "\n")
    out = tmp_path / "rows.jsonl"
    assert main(["sql-rows", str(db), str(questions), "--out", str(out)]) == 0
    assert "1 rows for shop.sqlite" in capsys.readouterr().out
    row = read_split(out)[0]
    assert row["input"] == (
        'Schema:\nCREATE TABLE "order" (id INTEGER PRIMARY KEY, "Customer Name" TEXT, total REAL, placed DATE);\n'
        'CREATE TABLE item (order_id INTEGER REFERENCES "order"(id), sku TEXT, qty INTEGER, '
        "PRIMARY KEY (order_id, sku));\n\nQuestion: How many orders are there?")
    assert row["db_path"] == str(db.resolve()) and row["shape"] == "count" and "db_id" not in row
    report = json.loads((evaluate(load_recipe(tiny_recipe()), which="base", data=str(out)) / "report.json").read_text())
    assert report["n_examples"] == 1 and "exec_accuracy" in report["base"]
    questions.write_text(json.dumps({"question": "q", "sql": "SELECT nope FROM item"}) + "\n")
    assert main(["sql-rows", str(db), str(questions), "--out", str(out)]) == 2
    assert "questions.jsonl: line 1: field 'sql': fails on shop.sqlite (no such column: nope)" in capsys.readouterr().err


def test_the_shape_table_adds_up_to_every_row():
    from tunebook.evaluate import NO_SHAPE, shape_groups

    rows = [{"shape": "join1"}, {}, {"shape": "agg"}, {"shape": ""}, {"shape": "agg"}]
    assert shape_groups(rows) == {"agg": [2, 4], "join1": [0], NO_SHAPE: [1, 3]}
    assert shape_groups([{}, {"other": 1}]) == {}, "no shape anywhere: no shape table"
