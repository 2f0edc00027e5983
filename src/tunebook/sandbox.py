"""Untrusted SQL, run where it cannot write, escape, hang or flood the machine.

Generated SQL (eval's predictions, the app's answers, GRPO rewards) is run by one long-lived worker process per
tunebook process, never in the caller's own:

- the database is opened read-only through a correctly quoted `file:` URI, extensions stay off, and an
  authorizer allows reading only (no writes, ATTACH, VACUUM INTO, schema changes, pragmas, extension loading);
- SQLite's own limits (`setlimit`) bound string and blob sizes, SQL length, columns, expression depth and more;
  `PRAGMA hard_heap_limit` and an address-space limit bound the worker's memory, temporary data stays in it;
- results are capped in rows and in bytes;
- the time limit holds twice: SQLite's progress handler stops a query between opcodes, and where one function
  call runs long (SQLite checks nothing inside `instr()` on megabyte strings) the caller kills the worker after a
  short grace and starts a new one.

A worker costs one interpreter start (~40 ms) once, then about 0.1 ms per query of IPC, so a 300-row eval pays
well under a second for it. Results are memoised per (database, query): a metric that scores subsets and shapes
asks the same query many times.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SQL_TIME_LIMIT_S = 2.0
# A reference (gold) query is the data's own, not a model's: on a large held-out database it may take longer
# than a model's answer is given, and a row whose gold runs out of time cannot be scored at all.
GOLD_TIME_LIMIT_S = 30.0
# After the soft limit, how long the caller waits for an answer before it kills the worker.
KILL_GRACE_S = 0.5
MAX_ROWS = 100_000
MAX_RESULT_BYTES = 16 * 2**20
# The worker's own ceilings: SQLite's heap and the process's address space.
HEAP_LIMIT_BYTES = 512 * 2**20
ADDRESS_SPACE_BYTES = 1 * 2**30
MEMO_ENTRIES = 20_000
MEMO_MAX_BYTES = 256 * 2**10  # results larger than this are not memoised

# sqlite3.Connection.setlimit: each category's ceiling (SQLite's defaults are 1e9 bytes, 2000 columns, ...).
LIMITS = {
    sqlite3.SQLITE_LIMIT_LENGTH: 4 * 2**20,  # bytes of one string, blob or row
    sqlite3.SQLITE_LIMIT_SQL_LENGTH: 100_000,
    sqlite3.SQLITE_LIMIT_COLUMN: 2000,  # SQLite's default: a lower limit makes a wide table's schema unreadable
    sqlite3.SQLITE_LIMIT_EXPR_DEPTH: 200,
    sqlite3.SQLITE_LIMIT_COMPOUND_SELECT: 50,
    sqlite3.SQLITE_LIMIT_FUNCTION_ARG: 32,
    sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH: 1_000,
    sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER: 0,
    sqlite3.SQLITE_LIMIT_ATTACHED: 0,
    sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH: 1,
    sqlite3.SQLITE_LIMIT_WORKER_THREADS: 0,
}

# Everything a SELECT needs; any other action (ATTACH, writes, schema changes, transactions) is denied.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
# Pragmas are denied whole, statement and table-function form alike: reading `database_list` would show the
# database's path on disk, `compile_options` the build; setting one changes the connection.
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"}

TIME_LIMIT_ERROR = "time limit exceeded"
NOT_A_QUERY_ERROR = "not a query: the answer holds no SELECT"


@dataclass
class QueryResult:
    """What one query gave: its column names and rows, or an error (then columns and rows are empty/None)."""

    columns: list[str] = field(default_factory=list)
    rows: list[tuple] | None = None
    error: str | None = None


def _authorizer(action: int, arg1: Any, arg2: Any, db_name: Any, trigger: Any) -> int:
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if str(arg2).lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY


def read_only_uri(db_path: str | Path) -> str:
    """A `file:` URI that opens the file read-only; `?`, `#` and `%` in the path are quoted, not parsed."""
    return f"file:{urllib.parse.quote(str(Path(db_path).resolve()))}?mode=ro"


def open_read_only(db_path: str | Path, deadline: list[float]) -> sqlite3.Connection:
    """A connection that can only read, with SQLite's limits set and a progress handler watching `deadline[0]`."""
    con = sqlite3.connect(read_only_uri(db_path), uri=True, check_same_thread=False)
    if hasattr(con, "enable_load_extension"):  # absent where Python's sqlite3 was built without extensions
        con.enable_load_extension(False)
    for category, value in LIMITS.items():
        con.setlimit(category, value)
    con.execute("PRAGMA temp_store = MEMORY")  # sorts and temp tables count against the heap limit, not the disk
    con.execute("PRAGMA query_only = ON")
    con.set_authorizer(_authorizer)
    con.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 1000)
    return con


def _value_bytes(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes) else 8


def execute(con: sqlite3.Connection, deadline: list[float], sql: str, time_limit_s: float,
            max_rows: int = MAX_ROWS, max_bytes: int = MAX_RESULT_BYTES) -> QueryResult:
    """Run one query on an `open_read_only` connection, within the limits (in the worker)."""
    deadline[0] = time.monotonic() + time_limit_s
    try:
        cursor = con.execute(sql)
        rows: list[tuple] = []
        size = 0
        for row in cursor:  # row by row, so the byte cap holds before a flood is in memory
            rows.append(row)
            size += sum(_value_bytes(v) for v in row)
            if len(rows) > max_rows:
                return QueryResult(error=f"more than {max_rows} rows")
            if size > max_bytes:
                return QueryResult(error=f"result larger than {max_bytes // 2**20} MB")
        if cursor.description is None:  # empty, only a comment, or a statement that returns no result set
            return QueryResult(error=NOT_A_QUERY_ERROR)
        return QueryResult([d[0] for d in cursor.description], rows)
    except sqlite3.OperationalError as exc:
        return QueryResult(error=TIME_LIMIT_ERROR if "interrupted" in str(exc) else str(exc))
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as exc:
        return QueryResult(error=str(exc) or type(exc).__name__)
    finally:
        deadline[0] = float("inf")


def _worker(conn_in: Any, conn_out: Any) -> None:
    """The worker's loop: (db_path, sql, time limit) in, a QueryResult out, until the pipe closes."""
    import resource

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = ADDRESS_SPACE_BYTES if hard == resource.RLIM_INFINITY else min(ADDRESS_SPACE_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    connections: OrderedDict[str, sqlite3.Connection] = OrderedDict()
    deadline = [float("inf")]
    while True:
        try:
            db_path, sql, time_limit_s = conn_in.recv()
        except (EOFError, OSError):
            return
        key = str(db_path)
        try:
            if key not in connections:
                connections[key] = open_read_only(db_path, deadline)
                if len(connections) > 16:
                    connections.popitem(last=False)[1].close()
            connections.move_to_end(key)
            result = execute(connections[key], deadline, sql, time_limit_s)
        except sqlite3.Error as exc:
            result = QueryResult(error=f"cannot open database: {exc}")
        conn_out.send(result)


def _set_heap_limit() -> None:
    """SQLite's heap ceiling is process-wide: set once, through a connection of its own."""
    with contextlib.suppress(sqlite3.Error):
        con = sqlite3.connect(":memory:")
        con.execute(f"PRAGMA hard_heap_limit = {HEAP_LIMIT_BYTES}")
        con.close()


class SqlSandbox:
    """Runs untrusted queries in a worker process that is killed and replaced when a query outlives its limit.

    The worker is `python -m tunebook.sandbox` in a session of its own (a Ctrl-C is the parent's to handle),
    talking over two pipes; it imports nothing but this module, so it starts the same from any caller. Thread-safe
    (the app's request threads share one); queries run one at a time.
    """

    def __init__(self, time_limit_s: float = SQL_TIME_LIMIT_S, grace_s: float = KILL_GRACE_S):
        self.time_limit_s = time_limit_s
        self.grace_s = grace_s
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._send: Any = None
        self._receive: Any = None
        self._memo: OrderedDict[tuple[str, str, float], QueryResult] = OrderedDict()
        self.kills = 0

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        to_worker, from_parent = os.pipe()
        from_worker, to_parent = os.pipe()
        package_root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                           if p)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tunebook.sandbox", str(to_worker), str(to_parent)], pass_fds=(to_worker, to_parent),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        os.close(to_worker)
        os.close(to_parent)
        self._send = Connection(from_parent, readable=False)
        self._receive = Connection(from_worker, writable=False)

    def _stop(self) -> None:
        for conn in (self._send, self._receive):
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
        self._process = self._send = self._receive = None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def query(self, db_path: str | Path, sql: str, time_limit_s: float | None = None) -> QueryResult:
        """(columns, rows) of one untrusted query on one SQLite file, or an error; never writes, never hangs."""
        limit = self.time_limit_s if time_limit_s is None else time_limit_s
        path = Path(db_path)
        if not path.is_file():
            return QueryResult(error=f"cannot open database: no file {path.name}")
        key = (str(path.resolve()), sql, limit)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
            result = self._ask(key[0], sql, limit)
            if result.error is not None or sum(_value_bytes(v) for r in result.rows or [] for v in r) <= MEMO_MAX_BYTES:
                self._memo[key] = result
                if len(self._memo) > MEMO_ENTRIES:
                    self._memo.popitem(last=False)
            return result

    def _ask(self, db_path: str, sql: str, limit: float) -> QueryResult:
        if self._process is None or self._process.poll() is not None:
            self._stop()
            self._start()
        try:
            self._send.send((db_path, sql, limit))
            if self._receive.poll(limit + self.grace_s):
                return self._receive.recv()
        except (EOFError, OSError):
            self._stop()
            return QueryResult(error="the query stopped the sandbox (out of memory?)")
        # Still running past the limit: inside one long function call, where SQLite checks nothing.
        self._stop()
        self.kills += 1
        return QueryResult(error=TIME_LIMIT_ERROR)


@functools.cache
def default_sandbox() -> SqlSandbox:
    """The process's sandbox (its worker starts on the first query and stops when the process exits)."""
    sandbox = SqlSandbox()
    atexit.register(sandbox.close)
    return sandbox


def query_table(db_path: str | Path, sql: str, time_limit_s: float | None = None
                ) -> tuple[list[str], list[tuple] | None, str | None]:
    """(columns, rows, None) of one untrusted query, or ([], None, error)."""
    result = default_sandbox().query(db_path, sql, time_limit_s)
    return result.columns, result.rows, result.error


def run_sql(db_path: str | Path, sql: str, time_limit_s: float | None = None) -> tuple[list[tuple] | None, str | None]:
    """(rows, None) of one untrusted query, or (None, error)."""
    _, rows, error = query_table(db_path, sql, time_limit_s)
    return rows, error


def serve_worker(read_fd: int, write_fd: int) -> None:
    """The worker process's main: set the heap ceiling, then answer queries until the parent goes."""
    from multiprocessing.connection import Connection

    _set_heap_limit()
    _worker(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":  # python -m tunebook.sandbox READ_FD WRITE_FD
    from tunebook import sandbox  # results are pickled as tunebook.sandbox.QueryResult, not __main__'s

    sandbox.serve_worker(int(sys.argv[1]), int(sys.argv[2]))
