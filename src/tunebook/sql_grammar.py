"""A grammar for SQLite SELECT queries that can only name what a database has.

`schema_grammar(db_path)` reads a database's tables and columns and writes a GBNF grammar (llama.cpp's grammar
format, which xgrammar also reads) for one SELECT query: tables are the database's tables, a column qualified by a
table is one of that table's columns, an unqualified column is one of the database's columns, aliases are `T1`,
`T2`, … (the training data's style). Keywords, functions, literals and nesting are SQLite's; keywords and names
are accepted in the cases people write them (SQLite ignores case in both). What a grammar cannot see — an alias
bound to the wrong table, a column of another table unqualified — is left to the execution check and the schema
repair (`verify.py`, `sql_repair.py`).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import string
from pathlib import Path

from tunebook.sandbox import read_only_uri

KEYWORDS = ("SELECT", "DISTINCT", "FROM", "WHERE", "GROUP", "BY", "HAVING", "ORDER", "LIMIT", "OFFSET", "AS", "JOIN",
            "LEFT", "INNER", "OUTER", "CROSS", "ON", "AND", "OR", "NOT", "IN", "IS", "NULL", "LIKE", "BETWEEN",
            "EXISTS", "ASC", "DESC", "UNION", "ALL", "INTERSECT", "EXCEPT", "CASE", "WHEN", "THEN", "ELSE", "END",
            "CAST", "INTEGER", "REAL", "TEXT", "NUMERIC")
AGGREGATES = ("COUNT", "SUM", "AVG", "MIN", "MAX", "TOTAL", "GROUP_CONCAT")
FUNCTIONS = ("ABS", "ROUND", "LENGTH", "LOWER", "UPPER", "SUBSTR", "TRIM", "REPLACE", "INSTR", "COALESCE", "IFNULL",
             "STRFTIME", "DATE", "JULIANDAY")
PLAIN_IDENTIFIER = re.compile(r"[^\W\d]\w*")  # letters (any script), digits, _; SQLite has the last word (`bare_allowed`)
ALIAS_COUNT = 9

_RULES = r"""
root ::= query (ws? ";")?
query ::= select (ws setop ws select)*
setop ::= kw-union (ws kw-all)? | kw-intersect | kw-except
select ::= kw-select ws (kw-distinct ws)? items (ws kw-from ws source)? (ws kw-where ws expr)? (ws group)? (ws order)? (ws limit)?
items ::= item (ws? "," ws? item)*
item ::= "*" | qualifier "." "*" | expr (ws kw-as ws label)?
label ::= [A-Za-z_] [A-Za-z0-9_]*
source ::= tableref (join)*
tableref ::= tablename (ws (kw-as ws)? alias)? | "(" ws? query ws? ")" (ws (kw-as ws)? alias)?
join ::= ws? "," ws? tableref | ws (joinkind ws)? kw-join ws tableref (ws kw-on ws expr)?
joinkind ::= kw-left (ws kw-outer)? | kw-inner | kw-cross
group ::= kw-group ws kw-by ws expr (ws? "," ws? expr)* (ws kw-having ws expr)?
order ::= kw-order ws kw-by ws orderitem (ws? "," ws? orderitem)*
orderitem ::= expr (ws (kw-asc | kw-desc))?
limit ::= kw-limit ws number (ws kw-offset ws number)?
expr ::= conj (ws kw-or ws conj)*
conj ::= neg (ws kw-and ws neg)*
neg ::= (kw-not ws)? cmp
cmp ::= sum (ws? cmpop ws? sum | ws kw-is ws (kw-not ws)? kw-null | ws (kw-not ws)? kw-in ws? "(" ws? (query | exprs) ws? ")" | ws (kw-not ws)? kw-like ws sum | ws (kw-not ws)? kw-between ws sum ws kw-and ws sum)?
cmpop ::= "=" | "==" | "!=" | "<>" | "<=" | ">=" | "<" | ">"
sum ::= term (ws? ("+" | "-" | "||") ws? term)*
term ::= factor (ws? ("*" | "/" | "%") ws? factor)*
factor ::= "-"? atom
atom ::= number | string | kw-null | column | call | "(" ws? (query | expr) ws? ")" | kw-exists ws? "(" ws? query ws? ")" | case | cast
exprs ::= expr (ws? "," ws? expr)*
call ::= aggregate ws? "(" ws? ("*" | (kw-distinct ws)? expr) ws? ")" | function ws? "(" ws? exprs? ws? ")"
case ::= kw-case (ws expr)? (ws kw-when ws expr ws kw-then ws expr)+ (ws kw-else ws expr)? ws kw-end
cast ::= kw-cast ws? "(" ws? expr ws kw-as ws (kw-integer | kw-real | kw-text | kw-numeric) ws? ")"
number ::= [0-9]+ ("." [0-9]+)?
string ::= "'" ([^'] | "''")* "'"
ws ::= [ \t\n]+
"""


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def _keyword_rule(word: str) -> str:
    name = "kw-" + word.lower().replace("_", "-")
    forms = dict.fromkeys([word, word.lower(), word.capitalize()])
    return f"{name} ::= " + " | ".join(_literal(f) for f in forms)


_TO_UPPER = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_TO_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _capitalised(word: str) -> str:
    return word[:1].translate(_TO_UPPER) + word[1:].translate(_TO_LOWER)


def _spellings(name: str) -> list[str]:
    """The ways a person or model writes one name: as the schema does, lower, upper, capitalised, and each word
    capitalised. SQLite compares identifiers case-insensitively, so all of them name the same thing; allowing only
    the schema's own case would push `MAX(Amount)` (column `amount`) onto some other column. Only ASCII letters
    change case: SQLite folds no other (`"ANNÉE"` is not the column `année`; quoted, it would be a string)."""
    words = "_".join(_capitalised(part) for part in name.split("_"))
    return list(dict.fromkeys([name, name.translate(_TO_LOWER), name.translate(_TO_UPPER), _capitalised(name),
                               words]))


@functools.lru_cache(maxsize=4096)
def bare_allowed(name: str) -> bool:
    """Whether SQLite reads `name` unquoted as a table and a column name wherever a query puts one. SQLite itself
    is asked: which of its keywords it takes as names (`text`, `end`, `key` yes; `table`, `order`, `index` no)
    depends on where they stand, and no fixed list of them is right."""
    if not PLAIN_IDENTIFIER.fullmatch(name):
        return False
    con = sqlite3.connect(":memory:")
    try:
        con.execute(f"CREATE TABLE {quote_identifier(name)} ({quote_identifier(name)} INTEGER)")
        con.execute(f"SELECT {name}, COUNT({name}) FROM {name} WHERE {name} = 1 AND {name} IN (SELECT {name} FROM "
                    f"{name}) GROUP BY {name} ORDER BY {name}")
        con.execute(f"SELECT {name}.{name} FROM {name} JOIN {name} AS x{name} ON x{name}.{name} = {name}.{name}")
        return True
    except sqlite3.Error:
        return False
    finally:
        con.close()


def _forms(name: str) -> list[str]:
    """How a query may write one identifier, as grammar literals: bare where SQLite allows it, and always
    double-quoted; in any of its `_spellings`."""
    forms = [_literal(quote_identifier(form)) for form in _spellings(name)]
    if bare_allowed(name):
        forms = [_literal(form) for form in _spellings(name)] + forms
    return forms


def _identifier(*names: str) -> str:
    """A grammar alternative for one identifier, or for any of several (each form once)."""
    return " | ".join(dict.fromkeys(form for name in names for form in _forms(name)))


def schema_of(db_path: str | Path) -> dict[str, list[str]]:
    """Table (or view) -> column names of a SQLite file (read-only; SQLite's own tables left out)."""
    con = sqlite3.connect(read_only_uri(db_path), uri=True)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                                             "ORDER BY rowid") if not t.lower().startswith("sqlite_")]
        return {t: [row[1] for row in con.execute(f"PRAGMA table_info({quote_identifier(t)})")] for t in tables}
    finally:
        con.close()


def quote_identifier(name: str) -> str:
    """A table or column name as SQL may always write it: double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def grammar_for_schema(schema: dict[str, list[str]]) -> str:
    """The GBNF grammar of one SELECT query over these tables and columns."""
    lines = [_RULES.strip()]
    tables = list(schema)
    rule_of = {t: f"cols-{i}" for i, t in enumerate(tables)}
    lines.append("tablename ::= " + " | ".join(f"({_identifier(t)})" for t in tables))
    for table, columns in schema.items():
        lines.append(f"{rule_of[table]} ::= " + " | ".join(f"({_identifier(c)})" for c in columns))
    # Every table's own spelling: `product_id` in one table and `Product_ID` in another are one name to SQLite.
    every_column = dict.fromkeys(c for columns in schema.values() for c in columns)
    lines.append(f"anycol ::= {_identifier(*every_column)}")
    qualified = [f"({_identifier(t)}) \".\" {rule_of[t]}" for t in tables]
    lines.append("column ::= " + " | ".join([*qualified, 'alias "." anycol', "anycol"]))
    lines.append("qualifier ::= tablename | alias")
    lines.append("alias ::= " + " | ".join(_literal(f"T{i}") for i in range(1, ALIAS_COUNT + 1)))
    lines.append("aggregate ::= " + " | ".join(f"kw-{a.lower().replace('_', '-')}" for a in AGGREGATES))
    lines.append("function ::= " + " | ".join(f"kw-{f.lower()}" for f in FUNCTIONS))
    lines += [_keyword_rule(w) for w in (*KEYWORDS, *AGGREGATES, *FUNCTIONS)]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=256)
def _cached(path: str, mtime_ns: int) -> str | None:
    schema = schema_of(path)
    return grammar_for_schema(schema) if schema else None


def schema_grammar(db_path: str | Path) -> str | None:
    """The grammar for one database file (cached until the file changes); None for a database with no tables, for
    which no query can name anything (decoding is then left unconstrained)."""
    path = Path(db_path).resolve()
    return _cached(str(path), path.stat().st_mtime_ns)


def identifiers(db_path: str | Path) -> set[str]:
    """Every table and column name of a database (lower case, as SQLite compares them)."""
    schema = schema_of(db_path)
    return {n.lower() for t, cols in schema.items() for n in (t, *cols)}
