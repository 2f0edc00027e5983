"""Metrics on hand-written cases, including hostile and runaway SQL."""

from __future__ import annotations

import math
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunebook.generation import shared_prefix_batches
from tunebook.metrics import (
    execution_match,
    extract_sql,
    is_ordered,
    perplexity,
    same_result,
    score,
    sql_exact_match,
    sql_metrics,
)
from tunebook.prompts import encode_example
from tunebook.sandbox import run_sql


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "pets.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE pets (id INTEGER PRIMARY KEY, name TEXT, species TEXT, age INTEGER, weight REAL);
        INSERT INTO pets VALUES (1, 'Rex', 'dog', 3, 12.5), (2, 'Tom', 'cat', 5, 4.0),
                                (3, 'Kiki', 'cat', 5, NULL), (4, 'Bo', 'dog', 1, 30.25);
    """)
    con.commit()
    con.close()
    return path


def test_order_matters_only_when_gold_orders(db):
    assert execution_match(db, "SELECT name FROM pets ORDER BY name DESC", "SELECT name FROM pets")[0]
    assert not execution_match(db, "SELECT name FROM pets ORDER BY name DESC", "SELECT name FROM pets ORDER BY name")[0]
    assert execution_match(db, "SELECT name FROM pets ORDER BY name ASC", "SELECT name FROM pets ORDER BY name")[0]
    assert is_ordered("SELECT a FROM t ORDER BY a") and not is_ordered("SELECT a FROM t WHERE a IN (SELECT b FROM u ORDER BY b)")


def test_duplicates_count_as_a_multiset(db):
    assert not execution_match(db, "SELECT DISTINCT species FROM pets", "SELECT species FROM pets")[0]
    assert not execution_match(db, "SELECT species FROM pets ORDER BY age", "SELECT species FROM pets ORDER BY id")[0]
    assert same_result([("a",), ("a",), ("b",)], [("b",), ("a",), ("a",)], ordered=False)
    assert not same_result([("a",), ("b",)], [("a",), ("a",), ("b",)], ordered=False)


def test_nulls_and_floats(db):
    assert execution_match(db, "SELECT weight FROM pets WHERE species = 'cat'", "SELECT weight FROM pets WHERE age = 5")[0]
    assert not execution_match(db, "SELECT weight FROM pets WHERE weight IS NOT NULL AND age = 5",
                               "SELECT weight FROM pets WHERE age = 5")[0]
    assert same_result([(1 / 3,)], [(0.33333333,)], ordered=False)


def test_hostile_sql_is_denied_and_never_touches_the_file(db, tmp_path):
    before = db.read_bytes()
    ok, error = execution_match(db, "DROP TABLE pets", "SELECT name FROM pets")
    assert not ok and "not authorized" in error
    ok, error = execution_match(db, f"ATTACH DATABASE '{tmp_path / 'evil.sqlite'}' AS evil", "SELECT name FROM pets")
    assert not ok and error
    assert not (tmp_path / "evil.sqlite").exists()
    for sql in ("INSERT INTO pets VALUES (9, 'X', 'y', 1, 1.0)", "UPDATE pets SET age = 0", "DELETE FROM pets",
                "PRAGMA user_version = 7", "CREATE TABLE t (a)", "SELECT 1; DROP TABLE pets"):
        rows, error = run_sql(db, sql)
        assert rows is None and error, sql
    assert db.read_bytes() == before


def test_runaway_recursive_cte_is_cut_off(db):
    sql = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r"
    started = time.monotonic()
    ok, error = execution_match(db, sql, "SELECT COUNT(*) FROM pets")
    assert not ok and error == "time limit exceeded"
    assert time.monotonic() - started < 10


def test_invalid_sql_and_exact_match(db):
    ok, error = execution_match(db, "SELEC name FROM pets", "SELECT name FROM pets")
    assert not ok and "syntax error" in error
    assert sql_exact_match("select  NAME from PETS where age>3", "SELECT name FROM pets WHERE age > 3")
    assert not sql_exact_match("SELECT name FROM pets WHERE age > 4", "SELECT name FROM pets WHERE age > 3")
    assert not sql_exact_match("this is not sql at all (", "SELECT 1")


def test_extract_sql_and_aggregate(db):
    assert extract_sql("Here you go:\n```sql\nSELECT name FROM pets;\n```") == "SELECT name FROM pets"
    scores = sql_metrics(["SELECT name FROM pets", "DROP TABLE pets", "SELEC"],
                         ["SELECT name FROM pets", "SELECT 1", "SELECT 1"], [db] * 3)
    assert scores["exec_accuracy"] == pytest.approx(100 / 3)
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["sql_error_rate"] == pytest.approx(200 / 3)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The text metrics as eval scores them (`metrics.score` over rows whose `output` is the reference)."""
    rows = [{"instruction": "Say it.", "output": ref} for ref in references]
    return score(["rouge", "bleu", "chrf", "exact_match"], predictions, rows, Path("unused.jsonl"))


def test_text_metrics():
    perfect = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert perfect["rouge1"] == pytest.approx(100) and perfect["rougeL"] == pytest.approx(100)
    assert perfect["bleu"] == pytest.approx(100) and perfect["exact_match"] == 100
    partial = text_metrics(["the cat sat"], ["the cat sat on the mat"])
    assert partial["rouge1"] == pytest.approx(100 * 2 * (1 * 0.5) / 1.5)  # P=1, R=0.5
    assert 0 < partial["chrf"] < 100 and partial["exact_match"] == 0
    assert text_metrics(["dog"], ["cat"])["rouge1"] == 0


def test_perplexity_matches_hand_computed_loss_with_and_without_shared_prefixes(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    schema = " ".join(f"CREATE TABLE t{i} (id INT, name TEXT);" for i in range(12))  # a long shared prefix
    examples = [{"instruction": "Say hi.", "input": "", "output": "hi there"},
                {"instruction": "Count.", "input": "one two", "output": "three four five"},
                *({"instruction": schema, "input": question, "output": answer} for question, answer in
                  [("How many t1?", "SELECT count(*) FROM t1"), ("Names in t3", "SELECT name FROM t3"),
                   ("All of t0, longer question here", "SELECT * FROM t0 WHERE id > 2")])]
    items = [encode_example(tokenizer, ex, "sys") for ex in examples]
    prompts = [it["input_ids"][:next(i for i, t in enumerate(it["labels"]) if t != -100)] for it in items]
    shared, rest = shared_prefix_batches(prompts, 8)
    assert [sorted(members) for _, members in shared] == [[2, 3, 4]] and sorted(rest) == [0, 1]
    nll, count = 0.0, 0
    for ex in examples:
        item = encode_example(tokenizer, ex, "sys")
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        for pos, label in enumerate(item["labels"][1:]):
            if label != -100:
                nll -= logp[pos, label].item()
                count += 1
    for batch_size in (2, 8):  # the shared group split over batches, and whole
        assert perplexity(model, tokenizer, examples, "sys", batch_size=batch_size) == pytest.approx(
            math.exp(nll / count), rel=1e-4)


def test_a_plain_pass_scores_each_reference_on_its_own_prompt_cache(tiny_model_dir, tokenizer):
    """Eval's plain pass gives perplexity without a pass of its own: each row's reference answer is scored on the
    cache its prompt was prefilled into, for rows in a shared-prefix group, alone, and twice the same prompt
    (a group with nothing after its prefix); a chat's earlier answers are prompt, not reference."""
    from tunebook.generation import generate_ids, prefix_groups
    from tunebook.metrics import answer_nll, reference_ids
    from tunebook.prompts import encode_prompt

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer.padding_side = "left"
    schema = " ".join(f"CREATE TABLE t{i} (id INT, name TEXT);" for i in range(12))
    shared = [{"instruction": schema, "input": q, "output": a} for q, a in
              [("How many t1?", "SELECT count(*) FROM t1"), ("Names in t3", "SELECT name FROM t3"),
               ("All of t0, longer question here", "SELECT * FROM t0 WHERE id > 2"), ("How many t1?", "SELECT 1")]]
    chat = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello there."},
                         {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye now."}]}
    story = "Translate to French: " + "the cat sat on the mat and looked out of the window. " * 5
    twice = [{"instruction": story, "input": "", "output": answer} for answer in ("le chat", "un chat")]
    examples = [{"instruction": "Say hi.", "input": "", "output": "hi there"}, *shared, chat, *twice]
    prompts = [encode_prompt(tokenizer, ex, "sys") for ex in examples]
    assert (len(prompts[-1]) - 1, [6, 7]) in prefix_groups(prompts, 3), "the same prompt twice: nothing after the prefix"
    assert tokenizer.decode(reference_ids(tokenizer, chat, "sys")).startswith("Bye now.")
    scores: dict[int, tuple[float, int]] = {}
    references = [reference_ids(tokenizer, ex, "sys") for ex in examples]
    answers = generate_ids(model, tokenizer, examples, "sys", 8, batch_size=3, references=references, scores=scores)
    assert answers == generate_ids(model, tokenizer, examples, "sys", 8, batch_size=3), "scoring changes no answer"
    assert sorted(scores) == list(range(len(examples)))
    for i, example in enumerate(examples):
        nll, tokens = answer_nll(model, tokenizer, [example], "sys")
        assert scores[i][1] == tokens == len(references[i])
        assert scores[i][0] == pytest.approx(nll, rel=1e-4), i


def test_review_metric_on_good_and_bad_fixes():
    from tunebook.metrics import review_metrics

    snippet = "```python\nif not x in y:\n    pass\n```"
    reference = "E713 (not-in-test): use `not in`.\n\nImproved code:\n```python\nif x not in y:\n    pass\n```"
    good = "E713 (not-in-test): use `not in`.\n\nImproved code:\n```python\nif x not in  y :\n\n  pass\n```"
    still_bad = "E713: fixed.\n\nImproved code:\n```python\nif not x in y:\n    pass\n```"
    broken = "E713.\n\nImproved code:\n```python\nif x not in y\n    pass\n```"
    no_code = "Looks fine to me."
    rewritten = "The code is slow.\n\n```python\ndef check(x, y):\n    return x\n```"  # clean, but not a fix
    answers = [good, still_bad, broken, no_code, rewritten]
    scores = review_metrics(answers, [reference] * 5, [snippet] * 5, ["E713"] * 5)
    assert scores["fix_parses"] == pytest.approx(60)  # good, still_bad, rewritten
    assert scores["rule_fixed"] == pytest.approx(40)  # good and (why the stricter measures exist) rewritten
    assert scores["fix_matches_reference"] == pytest.approx(20)  # good only: spacing does not matter
    assert scores["fix_unchanged"] == pytest.approx(20)  # still_bad hands the snippet back
    assert scores["rule_named"] == pytest.approx(60)  # good, still_bad and broken name E713
    assert scores["rule_checked"] == pytest.approx(100)
    assert scores["code_fixed"] == pytest.approx(20)  # good only: rewritten is not an edit of the snippet
    # A rule ruff does not know (another linter's code) cannot be checked, so nothing counts as fixed by it.
    other = review_metrics(answers, [reference] * 5, [snippet] * 5, ["W0611"] * 5)
    assert other["rule_checked"] == 0 and other["rule_fixed"] == 0
    assert other["code_fixed"] == pytest.approx(20), "the reference fix still counts"
    edited = "```python\nif x not in y:\n    pass\n```"
    assert review_metrics([edited], ["no reference code"], [snippet], ["E713"])["code_fixed"] == 100


def test_code_tokens_see_token_level_fixes_that_keep_the_ast():
    from tunebook.metrics import code_tokens

    nested = "if a:\n    x = 1\nelse:\n    if b:\n        x = 2\n"
    collapsed = "if a:\n    x = 1\nelif b:\n    x = 2\n"
    assert code_tokens(nested) != code_tokens(collapsed)  # PLR5501: same AST, different code
    assert code_tokens(collapsed) == code_tokens("if a:\n\n  x = 1\nelif b :\n  x=2\n")
    assert code_tokens("if a\n    pass\n") is None


@pytest.mark.parametrize("answer", ["", "   ", ";", "```sql\n```", "-- I don't know", "/* no idea */"])
def test_an_answer_with_no_query_is_a_failing_one_even_against_an_empty_gold_result(db, answer):
    from tunebook.rewards import sql_execution

    empty_gold = "SELECT name FROM pets WHERE species = 'horse'"
    ok, error = execution_match(db, extract_sql(answer), empty_gold)
    assert not ok and error is not None and error.startswith("not a query")
    scores = sql_metrics([answer], [empty_gold], [db])
    assert scores["exec_accuracy"] == 0 and scores["syntax_error"] == 100 and scores["sql_error_rate"] == 100
    assert sql_execution(None, [answer], [empty_gold], [str(db)]) == [0.0]


@pytest.mark.parametrize(("answer", "query"), [
    ("```sqlite\nSELECT name FROM pets\n```", "SELECT name FROM pets"),
    ("```SQL\nSELECT name FROM pets;\n```", "SELECT name FROM pets"),
    ("```sql\nSELECT name FROM pets", "SELECT name FROM pets"),  # a fence the answer never closed
    ("SELECT name FROM pets;\nThis lists every pet's name.", "SELECT name FROM pets"),
    ("SELECT name FROM pets WHERE name = 'a;b'; -- done", "SELECT name FROM pets WHERE name = 'a;b'"),
    (";; SELECT name FROM pets;", "SELECT name FROM pets"),
    ("SELECT name FROM pets", "SELECT name FROM pets"),
])
def test_the_query_is_the_first_statement_of_the_first_fence(answer, query):
    assert extract_sql(answer) == query


def test_a_gold_query_with_a_trailing_comment_still_orders_its_rows(db):
    gold = "SELECT name FROM pets ORDER BY age DESC, name; -- oldest first"
    assert is_ordered(gold) and is_ordered("SELECT name FROM pets ORDER BY name;;")
    assert not execution_match(db, "SELECT name FROM pets ORDER BY age ASC, name", gold)[0]
    assert execution_match(db, "SELECT name FROM pets ORDER BY age DESC, name", gold)[0]
    assert sql_exact_match("SELECT name FROM pets ORDER BY age DESC, name", gold)


def test_the_gold_query_gets_the_longer_limit_and_rows_it_cannot_score_give_no_rates(db):
    from tunebook.metrics import gold_result
    from tunebook.sandbox import SqlSandbox

    slow = ("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) "
            "SELECT count(*) FROM n")
    box = SqlSandbox(time_limit_s=0.01, grace_s=0.5)
    try:
        assert box.query(db, slow).error is not None, "control: over a model answer's limit"
        assert gold_result(db, slow, box).rows == [(300000,)]
    finally:
        box.close()
    assert sql_metrics(["SELECT 1"], ["SELECT nothing FROM nowhere"], [db]) == {"unscored_rows": 1}


def test_a_table_wider_than_500_columns_can_be_read(tmp_path):
    path = tmp_path / "wide.sqlite"
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE wide ({', '.join(f'c{i} INTEGER' for i in range(600))})")
    con.execute(f"INSERT INTO wide VALUES ({', '.join('1' for _ in range(600))})")
    con.commit()
    con.close()
    assert run_sql(path, "SELECT c599 FROM wide") == ([(1,)], None)


def test_text_metrics_read_every_script_and_unicode_form():
    from rouge_score import rouge_scorer

    from tunebook.metrics import METRICS, exact_match

    for text in ("le chat est sur la table, l'été dernier", "кошка сидит на столе", "猫はテーブルの上にいる", "القط على الطاولة"):
        rouge = METRICS["rouge"].score([text], [{"instruction": "q", "output": text}], Path("x.jsonl"))
        assert rouge == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0}, text
    assert METRICS["rouge"].score(["l'ôté"], [{"instruction": "q", "output": "l'été"}], Path("x"))["rouge1"] == 50.0
    # English is scored exactly as rouge-score's own tokenizer scores it (lower case, Porter stems)
    default = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pred, ref = "The cats were running quickly to the houses, didn't they?", "A cat runs quickly to its house; it did."
    ours = METRICS["rouge"].score([pred], [{"instruction": "q", "output": ref}], Path("x"))
    assert ours == pytest.approx({k: 100 * v.fmeasure for k, v in default.score(ref, pred).items()})
    nfd, nfc = "cafe\u0301 au lait", "caf\u00e9 au lait"
    assert exact_match([nfd], [nfc]) == 100
    chinese = "我们今天下午去公园散步吧"
    assert METRICS["bleu"].score([chinese], [{"instruction": "q", "output": chinese}], Path("x"))["bleu"] == \
        pytest.approx(100)


@pytest.mark.parametrize("answer", [
    "```python3\nx = 1\n```", "```Python\nx = 1\n```", "``` py\nx = 1\n```", "Fixed:\n```python\nx = 1\n",
    "```text\nImproved code:\n```\n\n```python\nx = 1\n```",
])
def test_the_improved_code_is_the_last_python_fence_however_it_is_written(answer):
    from tunebook.metrics import last_code_block

    assert last_code_block(answer).strip() == "x = 1"


def test_json_answers_are_read_strictly_and_compared_as_json():
    from tunebook.metrics import json_metrics, parse_json_answer
    from tunebook.rewards import json_match

    assert parse_json_answer('```python\nprint(1)\n```\n```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert json_metrics(['{"a": true}', "[false, true]", '{"a": 1.0}'], ['{"a": 1}', "[0, 1]", '{"a": 1}']) == \
        {"json_match": 100 / 3, "json_valid": 100.0}
    for bad in ('{"a": NaN}', '{"a": Infinity}', '{"a": 1, "a": 2}', "[" * 5000):
        assert parse_json_answer(bad) == (False, None), bad[:20]
    assert json_match(None, ["null", '{"a": 1}'], ["not json", '{"a": 1}']) == [0.2, 1.0]
