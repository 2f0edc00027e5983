"""Schema repair: a query that names a real column on the wrong table, rewritten so that it names it on the right one.

The schema grammar (`sql_grammar.py`) lets a query name only columns the database has, but it writes left to
right, so it cannot know which tables the FROM clause will bring: `SELECT name FROM pets` (where `name` is the
owner's) and `T1.weight` with `T1` bound to `owner` both pass the grammar and fail to run. A 135M model makes
this mistake on most multi-table questions (docs/sql.md): it skips the join and puts the other table's column on
the first. `repair(sql, schema)` fixes exactly that class, from the database's own schema and foreign keys, never
from a reference answer:

- a column qualified by a table that lacks it, when another table of the same SELECT has it, is requalified;
- a column that no table of its SELECT has is fetched by joining the nearest table that has it along the
  declared foreign keys (at most `MAX_HOPS` joins, through a link table when that is the path);
- once a join is added, or when SQLite would call a bare column ambiguous, bare columns are qualified by the
  first table of the SELECT that has them.

Verified decoding (`verify.py`) runs a repaired query through the same check as any other answer, so a repair
that does not run is never chosen. Hand-written because sqlglot's optimizer qualifies columns only when the
query already names the right tables, and has no notion of foreign keys.
"""

from __future__ import annotations

import functools
import sqlite3
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.optimizer.scope import traverse_scope

from tunebook.sandbox import read_only_uri
from tunebook.sql_grammar import bare_allowed, quote_identifier, schema_of

MAX_HOPS = 2


@dataclass(frozen=True)
class Schema:
    """A database's tables, their columns (lower case) and its foreign keys (table, column, table, column)."""

    columns: dict[str, frozenset[str]]
    foreign_keys: tuple[tuple[str, str, str, str], ...]

    def table(self, name: str) -> str | None:
        """The schema's spelling of a table name (SQLite compares names case-insensitively)."""
        return next((t for t in self.columns if t.lower() == name.lower()), None)


def read_schema(db_path: str | Path) -> Schema:
    """Tables, columns and declared foreign keys of a SQLite file (read-only)."""
    tables = schema_of(db_path)
    con = sqlite3.connect(read_only_uri(db_path), uri=True)
    try:
        keys = []
        for table in tables:
            for row in con.execute(f"PRAGMA foreign_key_list({quote_identifier(table)})"):
                target = next((t for t in tables if t.lower() == row[2].lower()), None)
                to = row[4] or (_primary_key(con, target) if target else None)  # no column named: the primary key
                if target is not None and to:
                    keys.append((table, row[3], target, to))
    finally:
        con.close()
    return Schema({t: frozenset(c.lower() for c in cols) for t, cols in tables.items()}, tuple(keys))


def _primary_key(con: sqlite3.Connection, table: str) -> str | None:
    return next((c[1] for c in con.execute(f"PRAGMA table_info({quote_identifier(table)})") if c[5]), None)


@functools.lru_cache(maxsize=256)
def _cached(path: str, mtime_ns: int) -> Schema:
    return read_schema(path)


def schema_for(db_path: str | Path) -> Schema:
    """The schema of one database file (cached until the file changes)."""
    path = Path(db_path).resolve()
    return _cached(str(path), path.stat().st_mtime_ns)


def join_path(schema: Schema, start: list[str], goal: set[str]) -> list[tuple[str, str, str, str]] | None:
    """The shortest chain of foreign-key joins from one of the `start` tables to a table in `goal` (names as the
    schema spells them): (from table, its column, to table, its column) per join; None when there is none."""
    edges: dict[str, list[tuple[str, str, str, str]]] = {}
    for a, col_a, b, col_b in schema.foreign_keys:
        edges.setdefault(a, []).append((a, col_a, b, col_b))
        edges.setdefault(b, []).append((b, col_b, a, col_a))
    queue = deque((table, []) for table in start)
    seen = set(start)
    while queue:
        table, path = queue.popleft()
        if path and table in goal:
            return path
        if len(path) == MAX_HOPS:
            continue
        for edge in edges.get(table, []):
            if edge[2] not in seen:
                seen.add(edge[2])
                queue.append((edge[2], [*path, edge]))
    return None


def repair(sql: str, schema: Schema) -> str | None:
    """The query with its columns put on tables that have them (see the module docstring), or None when nothing
    was changed or the query does not parse."""
    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
        scopes = traverse_scope(tree)
    except (sqlglot.errors.SqlglotError, RecursionError):
        return None
    changed = False
    for scope in scopes:
        if isinstance(scope.expression, exp.Select):
            changed |= _Select(scope, schema).repair()
    return tree.sql(dialect="sqlite") if changed else None


class _Select:
    """One SELECT of a query, with the tables it reads under the names it uses for them."""

    def __init__(self, scope: Any, schema: Schema) -> None:
        self.select, self.schema = scope.expression, schema
        # name the SELECT uses for a table (its alias, else its name) -> the table as the schema spells it
        self.sources = {src.alias_or_name: schema.table(src.name) for src in scope.sources.values()
                        if isinstance(src, exp.Table) and schema.table(src.name)}
        labels = {e.alias.lower() for e in self.select.expressions if e.alias}
        # columns the enclosing queries' tables have: a bare one in a correlated subquery is theirs, not missing
        self.outer: set[str] = set()
        outer = scope.parent
        while outer is not None:
            self.outer |= {c for src in outer.sources.values() if isinstance(src, exp.Table) and schema.table(src.name)
                           for c in schema.columns[schema.table(src.name)]}
            outer = outer.parent
        # this SELECT's own columns: sqlglot's scope also lists those of subqueries in its WHERE
        self.columns = [c for c in scope.columns if c.find_ancestor(exp.Select) is self.select and c.name != "*"
                        and not (not c.table and c.name.lower() in labels)]

    def source(self, name: str) -> str | None:
        """The name a column's qualifier refers to, as this SELECT spells it (None: not one of its tables)."""
        return next((alias for alias in self.sources if alias.lower() == name.lower()), None)

    def holders(self, name: str) -> list[str]:
        return [alias for alias, table in self.sources.items() if name.lower() in self.schema.columns[table]]

    def resolves(self, column: Any) -> bool:
        """The column names one of this SELECT's tables (an unknown qualifier: an outer query's, left alone)."""
        if not column.table:
            return bool(self.holders(column.name))
        alias = self.source(column.table)
        return alias is None or column.name.lower() in self.schema.columns[self.sources[alias]]

    def repair(self) -> bool:
        if not self.sources:
            return False
        changed = self.repair_join_conditions()
        joined = False
        for column in self.columns:
            if self.resolves(column) or column.find_ancestor(exp.Join) is not None:
                continue
            if not column.table and column.name.lower() in self.outer:
                continue
            if self.holders(column.name):
                self.qualify(column, self.holders(column.name)[0])
                changed = True
                continue
            qualifier = self.source(column.table) if column.table else None
            start = [self.sources[qualifier]] if qualifier else list(dict.fromkeys(self.sources.values()))
            path = join_path(self.schema, start, {t for t, cols in self.schema.columns.items()
                                                  if column.name.lower() in cols})
            if path is None:
                continue
            previous = qualifier or next(a for a, t in self.sources.items() if t == path[0][0])
            for join in self.joins_along(path, previous):
                self.select.append("joins", join)
            self.qualify(column, list(self.sources)[-1])
            changed = joined = True
        for column in self.columns:  # SQLite refuses a bare column two tables have; after a join, qualify them all
            found = self.holders(column.name)
            if not column.table and found and (len(found) > 1 or joined):
                self.qualify(column, found[0])
                changed = True
        return changed

    def repair_join_conditions(self) -> bool:
        """A JOIN whose ON names a column its tables lack joins along the foreign keys instead (through a link
        table when that is the path); left as it is when the keys do not connect it to the tables before it."""
        changed = False
        joins = list(self.select.args.get("joins") or [])
        first = self.select.args.get("from_")
        before = [first.this.alias_or_name] if first is not None and isinstance(first.this, exp.Table) else []
        for join in joins:
            alias = join.this.alias_or_name if isinstance(join.this, exp.Table) else None
            condition = join.args.get("on")
            if alias not in self.sources or condition is None or not before:
                before += [alias] if alias in self.sources else []
                continue
            if all(self.resolves(c) for c in condition.find_all(exp.Column)):
                before.append(alias)
                continue
            target = self.sources[alias]
            path = join_path(self.schema, [self.sources[a] for a in before if a in self.sources], {target})
            if path is None:
                before.append(alias)
                continue
            previous = next(a for a in before if self.sources.get(a) == path[0][0])
            links = self.joins_along(path[:-1], previous)
            for link in links:
                joins.insert(joins.index(join), link)
            last = list(self.sources)[-1] if links else previous
            join.set("on", exp.EQ(this=_column(path[-1][1], last), expression=_column(path[-1][3], alias)))
            before += [*(j.this.alias_or_name for j in links), alias]
            changed = True
        if changed:
            self.select.set("joins", joins)
        return changed

    def joins_along(self, path: list[tuple[str, str, str, str]], previous: str) -> list[Any]:
        """JOIN nodes that bring in each table of `path` after the table named `previous`; each becomes a source."""
        joins = []
        for _, col_a, table_b, col_b in path:
            alias = _new_alias(self.sources, table_b)
            table = exp.Table(this=_identifier(table_b),
                              alias=None if alias == table_b else exp.TableAlias(this=_identifier(alias)))
            joins.append(exp.Join(this=table, on=exp.EQ(this=_column(col_a, previous), expression=_column(col_b, alias))))
            self.sources[alias] = table_b
            previous = alias
        return joins

    @staticmethod
    def qualify(column: Any, alias: str) -> None:
        column.set("table", _identifier(alias))


def _identifier(name: str) -> Any:
    """A name as the repaired query writes it: quoted where SQLite would not read it bare (`"order"`, `"Order
    Items"`)."""
    return exp.to_identifier(name, quoted=not bare_allowed(name))


def _column(name: str, table: str) -> Any:
    return exp.Column(this=_identifier(name), table=_identifier(table))


def _new_alias(sources: dict[str, str], table: str) -> str:
    """The name a joined table goes by: its own when the query uses no aliases and does not have it yet, else the
    next free `T<n>` (the training data's style)."""
    taken = {name.lower() for name in sources}
    if table.lower() not in taken and all(name == t for name, t in sources.items()):
        return table
    n = 1
    while f"t{n}" in taken:
        n += 1
    return f"T{n}"
