"""The SQL sandbox on hostile queries: nothing written or escaped, nothing hangs past its limit or floods memory."""

from __future__ import annotations

import sqlite3
import time

import pytest

from tunebook.metrics import sql_metrics
from tunebook.sandbox import TIME_LIMIT_ERROR, SqlSandbox, read_only_uri


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "shop?#%.sqlite"  # characters a URI would otherwise parse
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL);"
                      + "".join(f"INSERT INTO items VALUES ({i}, 'item {i}', {i * 1.5});" for i in range(1, 201)))
    con.commit()
    con.close()
    return path


@pytest.fixture
def sandbox():
    box = SqlSandbox(time_limit_s=1.0, grace_s=0.5)
    yield box
    box.close()


def timed(sandbox, db, sql):
    started = time.monotonic()
    result = sandbox.query(db, sql)
    return result, time.monotonic() - started


def test_reads_work_through_a_quoted_uri(sandbox, db):
    result = sandbox.query(db, "SELECT count(*), max(price) FROM items")
    assert result.error is None and result.columns == ["count(*)", "max(price)"] and result.rows == [(200, 300.0)]
    assert "%3F" in read_only_uri(db) and "%23" in read_only_uri(db) and read_only_uri(db).endswith("?mode=ro")


def test_one_long_function_call_is_killed_at_the_hard_limit(sandbox, db):
    """SQLite's progress handler never runs inside instr() on long strings: the worker is killed instead."""
    hanging = "SELECT instr(printf('%.*c', 3000000, 'a'), printf('%.*c', 200000, 'a') || 'b')"
    result, seconds = timed(sandbox, db, hanging)
    assert result.error == TIME_LIMIT_ERROR and seconds < 1.0 + 0.5 + 1.0
    assert sandbox.kills == 1
    after, _ = timed(sandbox, db, "SELECT count(*) FROM items")
    assert after.rows == [(200,)], "a fresh worker answers the next query"


def test_huge_values_and_results_are_refused_without_taking_the_memory(sandbox, db):
    result, seconds = timed(sandbox, db, "SELECT zeroblob(300000000), zeroblob(300000000)")
    assert result.error == "string or blob too big" and seconds < 1.0
    result = sandbox.query(db, "SELECT zeroblob(4000000), zeroblob(4000000) FROM items")
    assert result.error and "result larger than" in result.error
    result = sandbox.query(db, "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) "
                               "SELECT group_concat(x) FROM r")
    assert result.error in ("string or blob too big", TIME_LIMIT_ERROR)
    result = sandbox.query(db, "SELECT a.id FROM items a, items b, items c")  # 8 million rows
    assert result.error in (TIME_LIMIT_ERROR,) or "more than" in result.error
    assert sandbox.query(db, "SELECT " + " + ".join(["1"] * 30000)).error  # SQL length and expression depth


@pytest.mark.parametrize("sql", [
    "VACUUM INTO '/tmp/tunebook-escape.sqlite'",
    "SELECT load_extension('/tmp/evil')",
    "SELECT * FROM pragma_database_list",
    "SELECT * FROM pragma_table_info('items')",
    "PRAGMA database_list",
    "PRAGMA query_only = OFF",
    "ATTACH DATABASE '/tmp/tunebook-attach.sqlite' AS evil",
    "CREATE TEMP TABLE t AS SELECT * FROM items",
    "DELETE FROM items",
    "SELECT fts3_tokenizer('simple')",
])
def test_escapes_are_denied_and_the_file_is_untouched(sandbox, db, sql, tmp_path):
    before = db.read_bytes()
    result = sandbox.query(db, sql)
    assert result.error and result.rows is None, sql
    assert db.read_bytes() == before
    assert not list(tmp_path.glob("*.sqlite-journal"))


def test_a_missing_database_names_no_path(sandbox, tmp_path):
    result = sandbox.query(tmp_path / "secret" / "nope.sqlite", "SELECT 1")
    assert result.error == "cannot open database: no file nope.sqlite"


def test_hostile_predictions_score_as_errors_and_gold_failures_are_counted_not_fatal(db):
    predictions = ["SELECT name FROM items WHERE id = 1", "SELECT zeroblob(300000000)", "DROP TABLE items",
                   "SELECT name FROM items WHERE id = 2"]
    gold = ["SELECT name FROM items WHERE id = 1", "SELECT name FROM items WHERE id = 3",
            "SELECT name FROM items WHERE id = 4", "SELECT name FROM nowhere"]
    scores = sql_metrics(predictions, gold, [db] * 4)
    assert scores["unscored_rows"] == 1, "the row whose gold fails is counted, not fatal"
    assert scores["exec_accuracy"] == pytest.approx(100 / 3) and scores["sql_error_rate"] == pytest.approx(200 / 3)
