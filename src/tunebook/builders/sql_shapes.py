"""Question/SQL pairs generated from a schema graph and its data, labelled by shape.

Each shape function takes a `Ctx` (schema, connection, seeded rng) and returns `(question, sql, shape)` or None
when the schema has nothing for it. Questions use the annotators' words for tables and columns and literal
values read from the data; several phrasings per shape. The caller executes every query and keeps only
informative ones (rows, not all NULL; LIMIT never cuts through a tie — checked here where a LIMIT is made).
"""

from __future__ import annotations

import random
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunebook.builders.spider import Column, ForeignKey, Schema, Table, quote_ident

Example = tuple[str, str, str]


@dataclass
class Ctx:
    schema: Schema
    con: sqlite3.Connection
    rng: random.Random
    people_style: bool = False  # also ask as people do (other words for names, implicit joins, casual typing)

    def rows(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()


# ---------------------------------------------------------------- words


IRREGULAR = {"person": "people", "people": "people", "staff": "staff", "child": "children", "man": "men",
             "woman": "women", "series": "series", "information": "information", "equipment": "equipment"}


def plural(words: str) -> str:
    *head, last = words.split() or ["item"]
    low = last.lower()
    if low in IRREGULAR:
        last = IRREGULAR[low]
    elif low.endswith(("ss", "x", "ch", "sh")):
        last = last + "es"
    elif low.endswith("s"):
        pass  # already plural ("details", "statistics")
    elif low.endswith("y") and len(low) > 1 and low[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last = last + "s"
    return " ".join([*head, last])


def a(words: str) -> str:
    return ("an " if words[:1].lower() in "aeiou" else "a ") + words


def lit(value: Any) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def say(value: Any, rng: random.Random, casually: bool = False) -> str:
    """A value as a person would write it in a question: sometimes quoted; `casually`, sometimes in lower case
    (the query keeps the value as the data has it, so the model learns to restore it)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if casually and isinstance(value, str) and value != value.lower() and rng.random() < 0.25:
        return value.lower()
    if isinstance(value, str) and (" " in value or rng.random() < 0.5):
        return f'"{value}"' if rng.random() < 0.6 else value
    return str(value)


# ---------------------------------------------------------------- saying it as people do

NAME_SYNONYM_P = 0.4  # how often one table or column name is said in other words than the schema's
CASUAL_P = 0.35  # how often a question is asked casually (lower case, no full stop, "can you tell me …")


def people_words(words: str, rng: random.Random) -> str:
    """A table's or column's plain-English name, sometimes in the words a person would use instead (the
    hand-written lexicon in sql_synonyms.py): the model must find the schema's name for it."""
    from tunebook.builders.sql_synonyms import PHRASES, SYNONYMS

    low = words.lower()
    if low in PHRASES and rng.random() < NAME_SYNONYM_P:
        return rng.choice(PHRASES[low])
    out = []
    for word in words.split():
        key = word.lower()
        if key in SYNONYMS and rng.random() < NAME_SYNONYM_P:
            out.append(rng.choice(SYNONYMS[key]))
        elif key.endswith("s") and key[:-1] in SYNONYMS and rng.random() < NAME_SYNONYM_P:
            out.append(plural(rng.choice(SYNONYMS[key[:-1]])))
        else:
            out.append(word)
    return " ".join(out)


def as_people_say(schema: Schema, rng: random.Random) -> Schema:
    """The schema with its tables' and columns' words (never their SQL names) said as people might."""
    from dataclasses import replace

    tables = {name: replace(t, words=people_words(t.words, rng),
                            columns=[replace(c, words=people_words(c.words, rng)) for c in t.columns])
              for name, t in schema.tables.items()}
    return replace(schema, tables=tables)


def casual(question: str, rng: random.Random) -> str:
    """Some questions typed as people type them: lower case, no closing punctuation, a polite opening."""
    if rng.random() >= CASUAL_P:
        return question
    text = question[0].lower() + question[1:]
    roll = rng.random()
    if roll < 0.3 and text.split()[0] in ("what", "which", "how", "who"):
        return "can you tell me " + text.rstrip("?") + "?"
    if roll < 0.55 and text.split()[0] in ("list", "show", "find", "give", "count"):
        return rng.choice(["please ", "i need to ", "could you "]) + text.rstrip(".")
    return text.rstrip(".?")


def q(name: str) -> str:
    return quote_ident(name)


# ---------------------------------------------------------------- picking columns and values


def fk_columns(schema: Schema, table: str) -> set[str]:
    return {fk.column for fk in schema.foreign_keys if fk.table == table}


def is_id(column: Column) -> bool:
    return bool(re.search(r"\b(id|code|key)\b", column.words.lower())) or column.primary


def content(ctx: Ctx, table: Table, kinds: tuple[str, ...] = ("text", "integer", "real", "date")) -> list[Column]:
    """Columns that carry content (not ids, not foreign keys) of the given kinds."""
    fks = fk_columns(ctx.schema, table.name)
    return [c for c in table.columns if c.kind in kinds and not is_id(c) and c.name not in fks]


def label_column(ctx: Ctx, table: Table) -> Column | None:
    """The column people name a row by: a name or title, else the first text column, else the key."""
    texts = content(ctx, table, ("text",))
    named = [c for c in texts if re.search(r"\b(name|title)\b", c.words.lower())]
    if named:
        return named[0]
    if texts:
        return texts[0]
    return next((c for c in table.columns if c.primary), table.columns[0] if table.columns else None)


def values(ctx: Ctx, table: Table, column: Column) -> list[Any]:
    found = ctx.rows(f"SELECT DISTINCT {q(column.name)} FROM {q(table.name)} WHERE {q(column.name)} IS NOT NULL")
    return sorted((v for (v,) in found), key=lambda v: (str(type(v)), v))


def pick(ctx: Ctx, items: list) -> Any:
    return ctx.rng.choice(items) if items else None


def pick_column(ctx: Ctx, kinds: tuple[str, ...]) -> tuple[Table, Column] | tuple[None, None]:
    """A random table with rows and one of its content columns of these kinds (None, None if there is none)."""
    table = pick(ctx, tables_with_rows(ctx))
    column = pick(ctx, content(ctx, table, kinds)) if table else None
    return (table, column) if column is not None else (None, None)


def tables_with_rows(ctx: Ctx) -> list[Table]:
    return [t for t in ctx.schema.tables.values()
            if t.columns and ctx.rows(f"SELECT COUNT(*) FROM {q(t.name)}")[0][0] >= 3]


@dataclass
class Filter:
    """A WHERE condition and how a person says it after "with …" and after "whose …"."""

    sql: str
    with_: str
    whose: str


def filter_on(ctx: Ctx, table: Table, alias: str = "") -> Filter | None:
    """A condition on a content column, with a value taken from the data."""
    prefix = f"{alias}." if alias else ""
    column = pick(ctx, content(ctx, table))
    if column is None:
        return None
    vals = values(ctx, table, column)
    if not vals:
        return None
    value = pick(ctx, vals)
    words, said, ident = column.words, say(value, ctx.rng, ctx.people_style), f"{prefix}{q(column.name)}"
    if column.kind in ("integer", "real") and len(vals) > 2:
        op, phrase = ctx.rng.choice([(">", "greater than"), ("<", "less than"), (">", "more than"),
                                     ("<", "below"), (">=", "at least"), ("<=", "at most")])
        return Filter(f"{ident} {op} {lit(value)}", f"{words} {phrase} {said}", f"{words} is {phrase} {said}")
    if column.kind == "date" or re.fullmatch(r"\d{4}-\d\d-\d\d", str(value)):
        op, phrase = ctx.rng.choice([(">", "after"), ("<", "before")])
        return Filter(f"{ident} {op} {lit(value)}", f"{words} {phrase} {value}", f"{words} is {phrase} {value}")
    with_ = ctx.rng.choice([f"{words} {said}", f"{a(words)} of {said}"])
    return Filter(f"{ident} = {lit(value)}", with_, f"{words} is {said}")


def no_tie_at_limit(ctx: Ctx, order_sql: str, limit: int) -> bool:
    """LIMIT k is an honest answer only if row k and row k+1 differ on the ordering value."""
    rows = ctx.rows(f"{order_sql} LIMIT {limit + 1}")
    return len(rows) <= limit or rows[limit - 1][-1] != rows[limit][-1]


# ---------------------------------------------------------------- single-table shapes


def shape_select(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    cols = content(ctx, t) if t else []
    if len(cols) < 1:
        return None
    chosen = ctx.rng.sample(cols, min(len(cols), ctx.rng.choice([1, 2])))
    words = " and ".join(c.words for c in chosen)
    question = ctx.rng.choice([f"List the {words} of all {plural(t.words)}.", f"What are the {words} of every {t.words}?",
                               f"Show {words} for each {t.words}.", f"Give me the {words} of the {plural(t.words)}."])
    return question, f"SELECT {', '.join(q(c.name) for c in chosen)} FROM {q(t.name)}", "select"


def shape_where(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    label = label_column(ctx, t) if t else None
    cond = filter_on(ctx, t) if t else None
    if label is None or cond is None or cond.sql.startswith(q(label.name) + " ="):
        return None
    sql = f"SELECT {q(label.name)} FROM {q(t.name)} WHERE {cond.sql}"
    question = ctx.rng.choice([f"What is the {label.words} of the {plural(t.words)} with {cond.with_}?",
                               f"Which {plural(t.words)} have {cond.with_}? Give their {label.words}.",
                               f"Find the {label.words} of every {t.words} whose {cond.whose}.",
                               f"List the {label.words} of {plural(t.words)} with {cond.with_}."])
    return question, sql, "where"


def shape_like(ctx: Ctx) -> Example | None:
    t, column = pick_column(ctx, ("text",))
    if column is None:
        return None
    words_in_data = sorted({w for v in values(ctx, t, column) for w in re.findall(r"[A-Za-z]{4,}", str(v))})
    word = pick(ctx, words_in_data)
    if word is None:
        return None
    label = label_column(ctx, t)
    sql = f"SELECT {q(label.name)} FROM {q(t.name)} WHERE {q(column.name)} LIKE '%{word}%'"
    question = ctx.rng.choice([f"Which {plural(t.words)} have a {column.words} containing \"{word}\"? Show their {label.words}.",
                               f"Find the {label.words} of {plural(t.words)} whose {column.words} includes the word {word}.",
                               f"List {plural(t.words)} with \"{word}\" in their {column.words}; give the {label.words}."])
    return question, sql, "like"


def shape_between(ctx: Ctx) -> Example | None:
    t, column = pick_column(ctx, ("integer", "real", "date"))
    if column is None:
        return None
    vals = values(ctx, t, column)
    if len(vals) < 4:
        return None
    low, high = sorted(ctx.rng.sample(vals, 2))
    label = label_column(ctx, t)
    sql = f"SELECT {q(label.name)} FROM {q(t.name)} WHERE {q(column.name)} BETWEEN {lit(low)} AND {lit(high)}"
    question = ctx.rng.choice([f"Which {plural(t.words)} have a {column.words} between {say(low, ctx.rng, ctx.people_style)} and {say(high, ctx.rng, ctx.people_style)}? Give their {label.words}.",
                               f"List the {label.words} of {plural(t.words)} whose {column.words} is from {say(low, ctx.rng, ctx.people_style)} to {say(high, ctx.rng, ctx.people_style)}.",
                               f"Find {plural(t.words)} with {column.words} in the range {say(low, ctx.rng, ctx.people_style)} to {say(high, ctx.rng, ctx.people_style)}; show the {label.words}."])
    return question, sql, "between"


def shape_in(ctx: Ctx) -> Example | None:
    t, column = pick_column(ctx, ("text",))
    if column is None:
        return None
    vals = values(ctx, t, column)
    if len(vals) < 3:
        return None
    chosen = ctx.rng.sample(vals, 2)
    label = label_column(ctx, t)
    if label.name == column.name:
        return None
    sql = f"SELECT {q(label.name)} FROM {q(t.name)} WHERE {q(column.name)} IN ({lit(chosen[0])}, {lit(chosen[1])})"
    a_, b_ = (say(v, ctx.rng, ctx.people_style) for v in chosen)
    question = ctx.rng.choice([f"Show the {label.words} of {plural(t.words)} whose {column.words} is {a_} or {b_}.",
                               f"Which {plural(t.words)} have {column.words} {a_} or {b_}? List their {label.words}.",
                               f"Find the {label.words} for {plural(t.words)} with a {column.words} of either {a_} or {b_}."])
    return question, sql, "in"


def shape_distinct(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    texts = content(ctx, t, ("text", "integer")) if t else []
    column = pick(ctx, texts)
    if column is None or len(values(ctx, t, column)) < 2:
        return None
    if ctx.rng.random() < 0.5:
        question = ctx.rng.choice([f"What are the different {plural(column.words)} of the {plural(t.words)}?",
                                   f"List the distinct {column.words} values among {plural(t.words)}.",
                                   f"Which {plural(column.words)} do the {plural(t.words)} have? List each once."])
        return question, f"SELECT DISTINCT {q(column.name)} FROM {q(t.name)}", "distinct"
    question = ctx.rng.choice([f"How many different {plural(column.words)} are there among the {plural(t.words)}?",
                               f"Count the distinct {plural(column.words)} of {plural(t.words)}.",
                               f"How many distinct {column.words} values do {plural(t.words)} have?"])
    return question, f"SELECT COUNT(DISTINCT {q(column.name)}) FROM {q(t.name)}", "count-distinct"


def shape_count(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    if t is None:
        return None
    cond = filter_on(ctx, t) if ctx.rng.random() < 0.7 else None
    if cond is None:
        question = ctx.rng.choice([f"How many {plural(t.words)} are there?", f"Count the {plural(t.words)}.",
                                   f"What is the total number of {plural(t.words)}?"])
        return question, f"SELECT COUNT(*) FROM {q(t.name)}", "count"
    question = ctx.rng.choice([f"How many {plural(t.words)} have {cond.with_}?",
                               f"Count the {plural(t.words)} with {cond.with_}.",
                               f"What is the number of {plural(t.words)} whose {cond.whose}?"])
    return question, f"SELECT COUNT(*) FROM {q(t.name)} WHERE {cond.sql}", "count+where"


AGGS = [("AVG", ["average", "mean"]), ("MAX", ["maximum", "highest", "largest"]),
        ("MIN", ["minimum", "lowest", "smallest"]), ("SUM", ["total", "sum of the"])]


def shape_agg(ctx: Ctx) -> Example | None:
    t, column = pick_column(ctx, ("integer", "real"))
    if column is None:
        return None
    fn, words = ctx.rng.choice(AGGS)
    word = ctx.rng.choice(words)
    if ctx.rng.random() < 0.35:
        fn2, words2 = ctx.rng.choice([x for x in AGGS if x[0] != fn])
        sql = f"SELECT {fn}({q(column.name)}), {fn2}({q(column.name)}) FROM {q(t.name)}"
        question = f"What are the {word} and {ctx.rng.choice(words2)} {column.words} of all {plural(t.words)}?"
        return question, sql, "agg"
    cond = filter_on(ctx, t) if ctx.rng.random() < 0.4 else None
    where = f" WHERE {cond.sql}" if cond else ""
    scope = f"{plural(t.words)} with {cond.with_}" if cond else f"all {plural(t.words)}"
    question = ctx.rng.choice([f"What is the {word} {column.words} of {scope}?",
                               f"Find the {word} {column.words} across {scope}.",
                               f"Give the {word} {column.words} for {scope}."])
    return question, f"SELECT {fn}({q(column.name)}) FROM {q(t.name)}{where}", "agg" + ("+where" if cond else "")


def group_column(ctx: Ctx, table: Table) -> Column | None:
    """A text column with a few repeated values: something to group by."""
    total = ctx.rows(f"SELECT COUNT(*) FROM {q(table.name)}")[0][0]
    options = [c for c in content(ctx, table, ("text", "integer"))
               if 2 <= len(values(ctx, table, c)) <= max(2, total // 2)]
    return pick(ctx, options)


def shape_group(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    g = group_column(ctx, t) if t else None
    if g is None:
        return None
    nums = [c for c in content(ctx, t, ("integer", "real")) if c.name != g.name]
    if nums and ctx.rng.random() < 0.5:
        n = ctx.rng.choice(nums)
        fn, words = ctx.rng.choice(AGGS[:3])
        word = ctx.rng.choice(words)
        sql = f"SELECT {q(g.name)}, {fn}({q(n.name)}) FROM {q(t.name)} GROUP BY {q(g.name)}"
        question = ctx.rng.choice([f"For each {g.words}, what is the {word} {n.words} of the {plural(t.words)}?",
                                   f"Show each {g.words} with the {word} {n.words} of its {plural(t.words)}.",
                                   f"What is the {word} {n.words} per {g.words}?"])
        return question, sql, "group"
    sql = f"SELECT {q(g.name)}, COUNT(*) FROM {q(t.name)} GROUP BY {q(g.name)}"
    question = ctx.rng.choice([f"How many {plural(t.words)} are there for each {g.words}?",
                               f"Count the {plural(t.words)} in each {g.words}.",
                               f"For every {g.words}, show the number of {plural(t.words)}."])
    return question, sql, "group"


def shape_having(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    g = group_column(ctx, t) if t else None
    if g is None:
        return None
    counts = sorted({c for (_, c) in ctx.rows(f"SELECT {q(g.name)}, COUNT(*) FROM {q(t.name)} GROUP BY {q(g.name)}")})
    if len(counts) < 2:
        return None
    k = ctx.rng.choice(counts[:-1])
    sql = f"SELECT {q(g.name)} FROM {q(t.name)} GROUP BY {q(g.name)} HAVING COUNT(*) > {k}"
    question = ctx.rng.choice([f"Which {plural(g.words)} have more than {k} {plural(t.words)}?",
                               f"List the {plural(g.words)} shared by over {k} {plural(t.words)}.",
                               f"Find every {g.words} that appears for more than {k} {plural(t.words)}."])
    return question, sql, "group+having"


SUPERLATIVE_WORDS = {"age": ("oldest", "youngest"), "price": ("most expensive", "cheapest"),
                     "height": ("tallest", "shortest"), "year": ("latest", "earliest")}


def shape_order(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    nums = content(ctx, t, ("integer", "real", "date")) if t else []
    n = pick(ctx, nums)
    label = label_column(ctx, t) if t else None
    if n is None or label is None or n.name == label.name:
        return None
    desc = ctx.rng.random() < 0.5
    base = f"SELECT {q(label.name)}, {q(n.name)} FROM {q(t.name)} ORDER BY {q(n.name)} {'DESC' if desc else 'ASC'}"
    if ctx.rng.random() < 0.4:
        question = ctx.rng.choice([
            f"List the {label.words} of all {plural(t.words)} sorted by {n.words} in {'descending' if desc else 'ascending'} order.",
            f"Show {plural(t.words)} ordered by {n.words}, {'highest' if desc else 'lowest'} first; give their {label.words}.",
        ])
        return question, f"SELECT {q(label.name)} FROM {q(t.name)} ORDER BY {q(n.name)} {'DESC' if desc else 'ASC'}", "order"
    k = ctx.rng.choice([1, 1, 1, 3, 5])
    if not no_tie_at_limit(ctx, base, k):
        return None
    key = next((w for w in SUPERLATIVE_WORDS if w in n.words.lower().split()), None)
    most = SUPERLATIVE_WORDS[key][0 if desc else 1] if key else None
    sql = f"SELECT {q(label.name)} FROM {q(t.name)} ORDER BY {q(n.name)} {'DESC' if desc else 'ASC'} LIMIT {k}"
    if k == 1:
        phrases = [f"What is the {label.words} of the {t.words} with the {'highest' if desc else 'lowest'} {n.words}?",
                   f"Which {t.words} has the {'largest' if desc else 'smallest'} {n.words}? Give its {label.words}."]
        if most:
            phrases.append(f"What is the {label.words} of the {most} {t.words}?")
    else:
        phrases = [f"Show the {label.words} of the {k} {plural(t.words)} with the {'highest' if desc else 'lowest'} {n.words}.",
                   f"List the top {k} {plural(t.words)} by {n.words} ({'highest' if desc else 'lowest'} first); give their {label.words}."]
    return ctx.rng.choice(phrases), sql, "superlative"


# ---------------------------------------------------------------- joins


def join_paths(schema: Schema, hops: int) -> list[list[tuple[str, ForeignKey, str]]]:
    """Paths of `hops` foreign-key edges through distinct tables: [(from, fk, to), …] (edges in either direction)."""
    edges: dict[str, list[tuple[ForeignKey, str]]] = {}
    for fk in schema.foreign_keys:
        if fk.table == fk.ref_table or fk.table not in schema.tables or fk.ref_table not in schema.tables:
            continue
        edges.setdefault(fk.table, []).append((fk, fk.ref_table))
        edges.setdefault(fk.ref_table, []).append((fk, fk.table))
    paths: list[list[tuple[str, ForeignKey, str]]] = [[(start, None, start)] for start in sorted(edges)]  # type: ignore[list-item]
    for _ in range(hops):
        paths = [[*p, (p[-1][2], fk, nxt)] for p in paths for fk, nxt in edges.get(p[-1][2], [])
                 if nxt not in {step[2] for step in p}]
    return [p[1:] for p in paths]


def join_sql(schema: Schema, path: list[tuple[str, ForeignKey, str]]) -> tuple[str, list[str]]:
    """`A AS T1 JOIN B AS T2 ON …` for a path, and the alias of each table along it."""
    aliases = ["T1"]
    sql = f"{q(path[0][0])} AS T1"
    for i, (src, fk, dst) in enumerate(path, start=2):
        prev = aliases[-1]
        alias = f"T{i}"
        if fk.table == src:
            on = f"{prev}.{q(fk.column)} = {alias}.{q(fk.ref_column)}"
        else:
            on = f"{prev}.{q(fk.ref_column)} = {alias}.{q(fk.column)}"
        sql += f" JOIN {q(dst)} AS {alias} ON {on}"
        aliases.append(alias)
    return sql, aliases


def shape_join(ctx: Ctx, hops: int) -> Example | None:
    paths = [p for p in join_paths(ctx.schema, hops)]
    path = pick(ctx, paths)
    if path is None:
        return None
    first, last = ctx.schema.tables[path[0][0]], ctx.schema.tables[path[-1][2]]
    label = label_column(ctx, first)
    cond = filter_on(ctx, last, alias=f"T{hops + 1}")
    if label is None or cond is None:
        return None
    joined, _ = join_sql(ctx.schema, path)
    distinct = "DISTINCT " if hops > 1 else ""
    sql = f"SELECT {distinct}T1.{q(label.name)} FROM {joined} WHERE {cond.sql}"
    via = f" (through their {ctx.schema.tables[path[0][2]].words})" if hops > 1 and ctx.rng.random() < 0.3 else ""
    question = ctx.rng.choice([
        f"What are the {label.words} of the {plural(first.words)} linked to {plural(last.words)} with {cond.with_}{via}?",
        f"Find the {label.words} of {plural(first.words)} whose {last.words} has {cond.with_}.",
        f"List the {label.words} of every {first.words} associated with {a(last.words)} whose {cond.whose}{via}.",
        # the joined table left unnamed, as people ask: the schema says where the column lives
        *([f"Which {plural(first.words)} have {cond.with_}? Give their {label.words}.",
           f"Find the {label.words} of {plural(first.words)} with {cond.with_}."] if ctx.people_style else []),
    ])
    return question, sql, f"join{hops}"


def shape_join_group(ctx: Ctx) -> Example | None:
    """Parent rows with a count (or the most) of their children: `GROUP BY` over a one-hop join."""
    fk = pick(ctx, [f for f in ctx.schema.foreign_keys if f.table != f.ref_table])
    if fk is None:
        return None
    parent, child = ctx.schema.tables[fk.ref_table], ctx.schema.tables[fk.table]
    label = label_column(ctx, parent)
    if label is None:
        return None
    joined = (f"{q(parent.name)} AS T1 JOIN {q(child.name)} AS T2 ON T1.{q(fk.ref_column)} = T2.{q(fk.column)}")
    group = f"GROUP BY T1.{q(fk.ref_column)}"
    roll = ctx.rng.random()
    if roll < 0.4:
        sql = f"SELECT T1.{q(label.name)}, COUNT(*) FROM {joined} {group}"
        question = ctx.rng.choice([f"For each {parent.words}, how many {plural(child.words)} does it have? Show its {label.words}.",
                                   f"Show the {label.words} of each {parent.words} and the number of {plural(child.words)}.",
                                   f"How many {plural(child.words)} are there per {parent.words}? List the {label.words} with the count."])
        return question, sql, "join1+group"
    if roll < 0.75:
        desc = ctx.rng.random() < 0.75
        order = f"SELECT T1.{q(label.name)}, COUNT(*) FROM {joined} {group} ORDER BY COUNT(*) {'DESC' if desc else 'ASC'}"
        if not no_tie_at_limit(ctx, order, 1):
            return None
        sql = f"SELECT T1.{q(label.name)} FROM {joined} {group} ORDER BY COUNT(*) {'DESC' if desc else 'ASC'} LIMIT 1"
        question = ctx.rng.choice([f"Which {parent.words} has the {'most' if desc else 'fewest'} {plural(child.words)}? Give its {label.words}.",
                                   f"What is the {label.words} of the {parent.words} with the {'largest' if desc else 'smallest'} number of {plural(child.words)}?"])
        return question, sql, "join1+group+superlative"
    counts = sorted({c for (_, c) in ctx.rows(f"SELECT T1.{q(label.name)}, COUNT(*) FROM {joined} {group}")})
    if len(counts) < 2:
        return None
    k = ctx.rng.choice(counts[:-1])
    sql = f"SELECT T1.{q(label.name)} FROM {joined} {group} HAVING COUNT(*) > {k}"
    question = ctx.rng.choice([f"Which {plural(parent.words)} have more than {k} {plural(child.words)}? Show their {label.words}.",
                               f"List the {label.words} of {plural(parent.words)} with over {k} {plural(child.words)}."])
    return question, sql, "join1+group+having"


# ---------------------------------------------------------------- nesting and set operations


def shape_nested(ctx: Ctx) -> Example | None:
    roll = ctx.rng.random()
    if roll < 0.4:  # comparison with an aggregate
        t = pick(ctx, tables_with_rows(ctx))
        nums = content(ctx, t, ("integer", "real")) if t else []
        n = pick(ctx, nums)
        label = label_column(ctx, t) if t else None
        if n is None or label is None or n.name == label.name:
            return None
        above = ctx.rng.random() < 0.5
        sql = (f"SELECT {q(label.name)} FROM {q(t.name)} WHERE {q(n.name)} {'>' if above else '<'} "
               f"(SELECT AVG({q(n.name)}) FROM {q(t.name)})")
        question = ctx.rng.choice([f"Which {plural(t.words)} have a {n.words} {'above' if above else 'below'} the average? Give their {label.words}.",
                                   f"List the {label.words} of {plural(t.words)} whose {n.words} is {'higher' if above else 'lower'} than the average {n.words}."])
        return question, sql, "nested"
    fk = pick(ctx, [f for f in ctx.schema.foreign_keys if f.table != f.ref_table])
    if fk is None:
        return None
    parent, child = ctx.schema.tables[fk.ref_table], ctx.schema.tables[fk.table]
    label = label_column(ctx, parent)
    if label is None:
        return None
    if roll < 0.7:
        sql = (f"SELECT {q(label.name)} FROM {q(parent.name)} WHERE {q(fk.ref_column)} NOT IN "
               f"(SELECT {q(fk.column)} FROM {q(child.name)} WHERE {q(fk.column)} IS NOT NULL)")
        question = ctx.rng.choice([f"Which {plural(parent.words)} have no {plural(child.words)}? Give their {label.words}.",
                                   f"List the {label.words} of {plural(parent.words)} that do not appear in any {child.words}.",
                                   f"Find {plural(parent.words)} without any {child.words}; show the {label.words}."])
        return question, sql, "nested"
    cond = filter_on(ctx, child)
    if cond is None:
        return None
    sql = (f"SELECT {q(label.name)} FROM {q(parent.name)} WHERE {q(fk.ref_column)} IN "
           f"(SELECT {q(fk.column)} FROM {q(child.name)} WHERE {cond.sql})")
    question = ctx.rng.choice([f"Find the {label.words} of {plural(parent.words)} that have {a(child.words)} with {cond.with_}.",
                               f"Which {plural(parent.words)} have at least one {child.words} whose {cond.whose}? Show the {label.words}."])
    return question, sql, "nested"


def shape_setop(ctx: Ctx) -> Example | None:
    t = pick(ctx, tables_with_rows(ctx))
    g = group_column(ctx, t) if t else None
    if g is None:
        return None
    label = label_column(ctx, t)
    others = [c for c in content(ctx, t, ("text",)) if c.name not in (g.name,)]
    target = label if label.name != g.name else pick(ctx, others)
    if target is None:
        return None
    vals = values(ctx, t, g)
    if len(vals) < 2:
        return None
    v1, v2 = ctx.rng.sample(vals, 2)
    op = ctx.rng.choice(["INTERSECT", "EXCEPT", "UNION"])
    part = f"SELECT {q(target.name)} FROM {q(t.name)} WHERE {q(g.name)} = "
    sql = f"{part}{lit(v1)} {op} {part}{lit(v2)}"
    s1, s2 = say(v1, ctx.rng, ctx.people_style), say(v2, ctx.rng, ctx.people_style)
    question = {
        "INTERSECT": f"Which {target.words} values appear both for {plural(t.words)} with {g.words} {s1} and for those with {g.words} {s2}?",
        "EXCEPT": f"Which {target.words} values belong to {plural(t.words)} with {g.words} {s1} but not to any with {g.words} {s2}?",
        "UNION": f"List the {target.words} of {plural(t.words)} whose {g.words} is {s1}, together with those whose {g.words} is {s2}.",
    }[op]
    return question, sql, "setop"


SHAPES: dict[str, tuple[Callable[[Ctx], Example | None], int]] = {
    # name: (generator, draws per database) — joins and harder shapes get more draws than plain selects
    "select": (shape_select, 2),
    "where": (shape_where, 4),
    "like": (shape_like, 2),
    "between": (shape_between, 2),
    "in": (shape_in, 2),
    "distinct": (shape_distinct, 2),
    "count": (shape_count, 3),
    "agg": (shape_agg, 3),
    "group": (shape_group, 3),
    "having": (shape_having, 2),
    "order": (shape_order, 4),
    "join1": (lambda ctx: shape_join(ctx, 1), 4),
    "join2": (lambda ctx: shape_join(ctx, 2), 3),
    "join3": (lambda ctx: shape_join(ctx, 3), 2),
    "join-group": (shape_join_group, 4),
    "nested": (shape_nested, 3),
    "setop": (shape_setop, 2),
}


def informative(ctx: Ctx, sql: str) -> bool:
    """The gold query runs and answers something: rows, not all NULL, not every row of a big table."""
    try:
        rows = ctx.rows(sql)
    except sqlite3.Error:
        return False
    return bool(rows) and not all(v is None for row in rows for v in row) and len(rows) <= 60


def examples_for(schema: Schema, con: sqlite3.Connection, rng: random.Random,
                 people_style: bool = False) -> list[Example]:
    """The informative, distinct question/SQL pairs of one database, over every shape.

    `people_style` also asks as people do: names in other words (`as_people_say`), joins with the joined table
    left unnamed, casual typing. The held-out test databases are asked without it, so that test subset stays
    the same questions whatever the training data does (the hand-written `people` subset is the other test).
    """
    ctx = Ctx(schema, con, rng, people_style)
    out: list[Example] = []
    seen_sql: set[str] = set()
    for generator, draws in SHAPES.values():
        for _ in range(draws):
            if people_style:
                ctx.schema = as_people_say(schema, rng)  # each question names things its own way
            made = generator(ctx)
            if made is not None and people_style:
                made = (casual(made[0], rng), *made[1:])
            if made is None or made[1] in seen_sql or not informative(ctx, made[1]):
                continue
            seen_sql.add(made[1])
            out.append(made)
    return out


def shape_of(sql: str) -> str:
    """The shape label of any gold query, read from its text (one definition for every SQL source).

    The most telling feature wins: set operation, then nesting, then the number of joins, grouping,
    ordering with LIMIT (superlative), aggregates, the kind of filter, and plain projection last.
    """
    text = " ".join(sql.upper().split())
    joins = text.count(" JOIN ")
    if re.search(r"\b(INTERSECT|EXCEPT|UNION)\b", text):
        return "setop"
    if "(SELECT" in text.replace("( SELECT", "(SELECT"):
        return "nested"
    if joins >= 3:
        return "join3"
    if joins == 2:
        return "join2"
    grouped = "GROUP BY" in text
    if joins == 1:
        return "join1+group" if grouped else "join1"
    if grouped:
        return "group+having" if "HAVING" in text else "group"
    if "ORDER BY" in text:
        return "superlative" if " LIMIT " in text else "order"
    if re.search(r"\b(AVG|SUM|MIN|MAX)\(", text):
        return "agg"
    if "COUNT(" in text:
        return "count"
    for shape, pattern in (("like", r"\bLIKE\b"), ("between", r"\bBETWEEN\b"), ("in", r"\bIN \(")):
        if re.search(pattern, text):
            return shape
    if "DISTINCT" in text:
        return "distinct"
    return "where" if " WHERE " in text else "select"
