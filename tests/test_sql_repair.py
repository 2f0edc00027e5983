"""Schema repair: a column named on a table that lacks it is put on the table that has it, along the database's
foreign keys, and a repaired query answers what the model's query meant; what cannot be repaired is left alone."""

from __future__ import annotations

import pytest
from conftest import sqlite_file

from tunebook.metrics import METRICS
from tunebook.sandbox import run_sql
from tunebook.sql_repair import join_path, repair, schema_for
from tunebook.verify import Tally, Verifier, choose

SCHEMA = """
CREATE TABLE city (city_id INTEGER PRIMARY KEY, city_name TEXT);
CREATE TABLE student (stu_id INTEGER PRIMARY KEY, name TEXT, age INTEGER, city_id INTEGER REFERENCES city(city_id));
CREATE TABLE pets (pet_id INTEGER PRIMARY KEY, pet_type TEXT, weight REAL);
CREATE TABLE has_pet (stu_id INTEGER REFERENCES student(stu_id), pet_id INTEGER REFERENCES pets);
INSERT INTO city VALUES (1, 'Oslo'), (2, 'Lima');
INSERT INTO student VALUES (1, 'Ann', 22, 1), (2, 'Bo', 19, 2), (3, 'Cy', 25, 1);
INSERT INTO pets VALUES (1, 'dog', 12.5), (2, 'cat', 4.0), (3, 'dog', 9.0);
INSERT INTO has_pet VALUES (1, 1), (2, 2), (3, 2);
"""


@pytest.fixture
def db(tmp_path):
    return sqlite_file(tmp_path / "school.sqlite", SCHEMA)


def rows_of(db, sql: str) -> list[tuple]:
    rows, error = run_sql(db, sql)
    assert error is None, (sql, error)
    return sorted(rows)


@pytest.mark.parametrize(("broken", "meant"), [
    # the other table's column, its table never joined: joined along the foreign key
    ("SELECT name FROM student WHERE city_name = 'Oslo'",
     "SELECT T1.name FROM student AS T1 JOIN city AS T2 ON T1.city_id = T2.city_id WHERE T2.city_name = 'Oslo'"),
    # ... two joins away, through the link table
    ("SELECT name FROM student WHERE pet_type = 'dog'",
     "SELECT S.name FROM student AS S JOIN has_pet AS H ON S.stu_id = H.stu_id JOIN pets AS P ON H.pet_id = P.pet_id "
     "WHERE P.pet_type = 'dog'"),
    # qualified by the wrong alias, the right table already joined
    ("SELECT T1.city_name FROM student AS T1 JOIN city AS T2 ON T1.city_id = T2.city_id WHERE T1.age > 20",
     "SELECT T2.city_name FROM student AS T1 JOIN city AS T2 ON T1.city_id = T2.city_id WHERE T1.age > 20"),
    # a join on a column neither table has: joined along the keys, through the link table
    ("SELECT T1.name FROM student AS T1 JOIN pets AS T2 ON T1.pet_id = T2.pet_id WHERE T2.weight < 5",
     "SELECT S.name FROM student AS S JOIN has_pet AS H ON S.stu_id = H.stu_id JOIN pets AS P ON H.pet_id = P.pet_id "
     "WHERE P.weight < 5"),
    # a bare column two joined tables have (SQLite: ambiguous)
    ("SELECT stu_id FROM student JOIN has_pet ON student.stu_id = has_pet.stu_id WHERE pet_id = 2",
     "SELECT H.stu_id FROM student AS S JOIN has_pet AS H ON S.stu_id = H.stu_id WHERE H.pet_id = 2"),
    # inside a subquery, the outer query untouched
    ("SELECT name FROM student WHERE stu_id IN (SELECT stu_id FROM has_pet WHERE pet_type = 'cat')",
     "SELECT name FROM student WHERE stu_id IN (SELECT H.stu_id FROM has_pet AS H JOIN pets AS P "
     "ON H.pet_id = P.pet_id WHERE P.pet_type = 'cat')"),
])
def test_a_column_on_the_wrong_table_is_put_on_the_right_one(db, broken, meant):
    assert run_sql(db, broken)[1] is not None, "control: the broken query fails"
    fixed = repair(broken, schema_for(db))
    assert fixed is not None
    assert rows_of(db, fixed) == rows_of(db, meant) != []


@pytest.mark.parametrize("query", [
    "SELECT name FROM student WHERE age > 20",  # nothing wrong
    "SELECT nickname FROM student",  # no table has the column
    "SELECT name FROM student WHERE EXISTS (SELECT 1 FROM has_pet WHERE has_pet.stu_id = student.stu_id)",  # outer
    "SELECT name FROM student WHERE",  # does not parse
    "SELECT name FROM nowhere WHERE pet_type = 'dog'",  # no table of the schema to start from
])
def test_what_needs_no_repair_or_cannot_be_repaired_is_left_alone(db, query):
    assert repair(query, schema_for(db)) is None


def test_foreign_keys_without_a_column_name_point_at_the_primary_key(db):
    schema = schema_for(db)
    assert ("has_pet", "pet_id", "pets", "pet_id") in schema.foreign_keys
    assert join_path(schema, ["student"], {"pets"}) == [("student", "stu_id", "has_pet", "stu_id"),
                                                        ("has_pet", "pet_id", "pets", "pet_id")]
    assert join_path(schema, ["city"], {"pets"}) is None, "three joins away: past MAX_HOPS"


def test_verified_choice_takes_a_repair_that_passes_before_any_candidate(db, tmp_path):
    metric = METRICS["sql_execution"]
    verifier = Verifier(metric.grammar, metric.check, metric.check_best, metric.repair)
    judge = verifier.judge({"instruction": "Write a SQLite query.", "db_path": str(db)}, tmp_path / "rows.jsonl")
    tally = Tally()
    broken = "SELECT name FROM student WHERE city_name = 'Lima'"
    chosen = choose(judge(broken), ["SELECT name FROM student"], judge, 2, tally, broken)
    assert rows_of(db, chosen) == [("Bo",)]
    assert tally.as_dict() == {"greedy_passed": 0, "greedy_repaired": 1, "rescued_by_a_candidate": 0,
                               "no_candidate_passed": 0}
    hopeless = "SELECT nickname FROM student"
    assert choose(judge(hopeless), ["SELECT name FROM student"], judge, 2, tally, hopeless) == "SELECT name FROM student"
    assert tally.rescued == 1


def test_names_sqlite_reserves_are_written_quoted(tmp_path):
    db = sqlite_file(tmp_path / "shop.sqlite", """
        CREATE TABLE "order" (id INTEGER PRIMARY KEY, "group" TEXT);
        CREATE TABLE "Order Items" (item_id INTEGER PRIMARY KEY, order_id INTEGER REFERENCES "order"(id), qty INTEGER);
        INSERT INTO "order" VALUES (1, 'a'), (2, 'b');
        INSERT INTO "Order Items" VALUES (1, 1, 3), (2, 2, 4);
    """)
    fixed = repair("""SELECT qty FROM "order" WHERE "group" = 'a'""", schema_for(db))
    assert fixed is not None and '"order".id' in fixed and "JOIN \"Order Items\"" in fixed
    assert rows_of(db, fixed) == [(3,)]


def test_a_correlated_subquerys_outer_column_is_left_to_the_outer_query(tmp_path):
    db = sqlite_file(tmp_path / "firm.sqlite", """
        CREATE TABLE dept (dept_id INTEGER PRIMARY KEY, dname TEXT, budget INTEGER);
        CREATE TABLE emp (emp_id INTEGER PRIMARY KEY, dept_id INTEGER REFERENCES dept(dept_id), salary INTEGER);
        INSERT INTO dept VALUES (1, 'a', 10), (2, 'b', 100);
        INSERT INTO emp VALUES (1, 1, 50), (2, 1, 60), (3, 2, 50);
    """)
    query = ("SELECT dname FROM dept WHERE (SELECT COUNT(*) FROM emp WHERE emp.dept_id = dept.dept_id "
             "AND salary > budget) = 2")
    assert rows_of(db, query) == [("a",)]
    assert repair(query, schema_for(db)) is None


def test_held_out_rows_by_path_and_training_rows_by_id_name_one_database(tiny_recipe, sql_data, tmp_path):
    from tunebook.config import load_recipe
    from tunebook.data import read_split
    from tunebook.sql_task import eval_subsets

    recipe = load_recipe(tiny_recipe())
    trained = read_split(recipe.data.train)[0]["db_id"]
    unseen = next(r for r in read_split(sql_data / "test.jsonl") if r.get("unseen_schema") and r["db_id"] != trained)
    rows = [{"instruction": "q", "output": "SELECT 1", "db_path": str(sql_data / "databases" / f"{db}.sqlite"),
             "source": "spider"} for db in (trained, unseen["db_id"])]
    assert eval_subsets(recipe, rows, tmp_path / "mine.jsonl") == {"unseen_schema": [1], "unseen_real_schema": [1]}
