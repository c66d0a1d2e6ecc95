"""Execution accuracy for NL2SQL (SPEC.md section 5, domain metric): run predicted and gold SQL, compare.

A prediction is right when its result equals the gold query's result on the sample's database: as a
multiset of rows, or as a sequence when the gold query has ORDER BY. Predictions run on a read-only
connection whose authorizer allows only reading (no ATTACH, PRAGMA or writes), with a time limit and a
row cap; any error (syntax, unknown column, timeout, several statements) counts as wrong.
"""
from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

DATABASES_DIR = "databases"  # beside a NL2SQL JSONL: one <db_id>.sqlite per database
MAX_ROWS = 10_000
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


class SQLExecutionError(RuntimeError):
    """A query failed: bad SQL, timeout, too many rows, or a missing database."""


def connect_readonly(db_path: str | Path) -> sqlite3.Connection:
    """A read-only connection to an existing SQLite file (never creates one)."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"SQLite database not found: {db_path}")
    conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = ON")
    # mode=ro guards this file only; ATTACH could still create others, so allow nothing but reading.
    conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY)
    return conn


def run_sql(conn: sqlite3.Connection, sql: str, timeout_s: float = 2.0, max_rows: int = MAX_ROWS) -> list[tuple]:
    """Rows of `sql` on `conn`; raises SQLExecutionError on any failure, timeout, or more than `max_rows` rows."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)  # non-zero return aborts the query
    try:
        rows = conn.execute(sql).fetchmany(max_rows + 1)
    except (sqlite3.Error, sqlite3.Warning, ValueError) as e:  # Warning: several statements at once
        raise SQLExecutionError(f"{type(e).__name__}: {e}") from e
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > max_rows:
        raise SQLExecutionError(f"more than {max_rows} rows")
    return rows


def _normalise(rows: list[tuple]) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


def same_result(predicted: list[tuple], gold: list[tuple], ordered: bool) -> bool:
    """Equal as sequences when `ordered`, else as multisets; floats compared to 6 decimals."""
    p, g = _normalise(predicted), _normalise(gold)
    return p == g if ordered else Counter(p) == Counter(g)


def execution_matches(predictions: Sequence[str], samples: Sequence[Mapping], db_dir: str | Path,
                      timeout_s: float = 2.0) -> list[bool]:
    """Per sample: does `predictions[i]` give the result of `samples[i]["response"]` (the gold SQL) on
    `db_dir/<samples[i]["db_id"]>.sqlite`? A failing gold query is a data error and raises."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    conns: dict[str, sqlite3.Connection] = {}
    matches = []
    try:
        for pred, sample in zip(predictions, samples):
            db_id = sample["db_id"]
            if db_id not in conns:
                conns[db_id] = connect_readonly(Path(db_dir) / f"{db_id}.sqlite")
            conn, gold_sql = conns[db_id], sample["response"]
            try:
                gold = run_sql(conn, gold_sql, timeout_s)
            except SQLExecutionError as e:
                raise SQLExecutionError(f"gold SQL of sample {sample.get('id')!r} fails on {db_id}: {e}") from e
            try:
                matches.append(same_result(run_sql(conn, pred, timeout_s), gold, bool(_ORDER_BY.search(gold_sql))))
            except SQLExecutionError:
                matches.append(False)
    finally:
        for conn in conns.values():
            conn.close()
    return matches


def execution_accuracy(predictions: Sequence[str], samples: Sequence[Mapping], db_dir: str | Path,
                       timeout_s: float = 2.0) -> float:
    """The fraction of `execution_matches` that hold (the demo's domain metric)."""
    if not samples:
        raise ValueError("execution_accuracy needs at least one sample")
    matches = execution_matches(predictions, samples, db_dir, timeout_s)
    return sum(matches) / len(matches)
