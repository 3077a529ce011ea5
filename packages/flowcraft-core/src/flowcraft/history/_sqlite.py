"""SQLite history: a file, no server, shared by the processes of one machine."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from flowcraft.history._cap import DEFAULT_MAX_VALUE_BYTES, cap_events
from flowcraft.history._purge import Dialect, PurgeResult, Selection, purge_statements
from flowcraft.history._records import (
    SCHEMA_VERSION,
    HistoryError,
    HistoryEvent,
    RunSummary,
    Statements,
    blueprint_of,
    check_name,
    clean,
    execute_rows,
    later_status,
    loads_data,
    rows_of,
    status_of,
)

__all__ = ["SqliteHistoryStore"]

logger = logging.getLogger("flowcraft.history")

_SQLITE = {
    "meta_table": "CREATE TABLE IF NOT EXISTS {meta} (name TEXT PRIMARY KEY, value TEXT)",
    "put_version": "INSERT INTO {meta} (name, value) VALUES ('schema_version', ?) "
    "ON CONFLICT (name) DO NOTHING",
    "get_version": "SELECT value FROM {meta} WHERE name = 'schema_version'",
    "events_table": "CREATE TABLE IF NOT EXISTS {events} ("
    "seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
    "event_key TEXT NOT NULL, kind TEXT NOT NULL, node_id TEXT, activation INTEGER, "
    "attempt INTEGER, at REAL NOT NULL, worker TEXT NOT NULL, data TEXT NOT NULL, "
    "UNIQUE (run_id, event_key))",
    "runs_table": "CREATE TABLE IF NOT EXISTS {runs} ("
    "run_id TEXT PRIMARY KEY, blueprint_id TEXT, status TEXT NOT NULL, "
    "status_at REAL NOT NULL, started_at REAL NOT NULL, updated_at REAL NOT NULL)",
    "runs_index": "CREATE INDEX IF NOT EXISTS {runs}_started ON {runs} (started_at)",
    # A purge picks runs by their last event's time.
    "runs_updated_index": "CREATE INDEX IF NOT EXISTS {runs}_updated ON {runs} (updated_at)",
    "insert_events": "INSERT INTO {events} (run_id, event_key, kind, node_id, activation, "
    "attempt, at, worker, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, event_key) DO NOTHING",
    "upsert_runs": "INSERT INTO {runs} AS r (run_id, blueprint_id, status, status_at, "
    "started_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET "
    "blueprint_id = COALESCE(r.blueprint_id, excluded.blueprint_id), "
    "{status_case}, "
    "status_at = MAX(r.status_at, excluded.status_at), "
    "started_at = MIN(r.started_at, excluded.started_at), "
    "updated_at = MAX(r.updated_at, excluded.updated_at)",
    "select_events": "SELECT seq, run_id, event_key, kind, node_id, activation, attempt, at, "
    "worker, data FROM {events} WHERE run_id = ? ORDER BY at, seq",
    "select_runs": "SELECT run_id, blueprint_id, status, started_at, updated_at FROM {runs} "
    "ORDER BY started_at DESC LIMIT ?",
    "select_runs_of": "SELECT run_id, blueprint_id, status, started_at, updated_at FROM {runs} "
    "WHERE status = ? ORDER BY started_at DESC LIMIT ?",
}

_DIALECT = Dialect(
    param=lambda n: "?", in_ids="run_id IN (SELECT value FROM json_each({p}))", ids=json.dumps
)

T = TypeVar("T")


class SqliteHistoryStore:
    """History in a SQLite file (``":memory:"`` for one process's own).

    Reads, purges and writes that must wait for the file run on one thread of its
    own. A write first tries the event loop itself, on a second connection that never
    waits: a batch takes a few milliseconds there, while the thread hop cost the loop
    more (the writer thread took the GIL from the loop, holding it up to the switch
    interval each time); when another process holds the file it goes to the thread,
    which waits up to ``timeout`` seconds. ``write_on_loop=False`` always uses the
    thread. WAL mode lets several worker processes write one file.
    A value (a node's input or output, a context write, ...) whose JSON is longer
    than ``max_value_bytes`` is stored as a marker with its size and hash (None: no
    cap; see :class:`~flowcraft.history.Truncated`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        table_prefix: str = "flowcraft_history",
        timeout: float = 30.0,
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        write_on_loop: bool = True,
    ) -> None:
        if max_value_bytes is not None and max_value_bytes < 1:
            raise ValueError("max_value_bytes must be at least 1 (or None: no cap)")
        self.path = str(path)
        self.max_value_bytes = max_value_bytes
        self._sql = Statements(_SQLITE, check_name(table_prefix))
        self._timeout = timeout
        self._conn: sqlite3.Connection | None = None
        # The event loop's own connection (busy timeout 0), once the schema exists;
        # never for an in-memory database (a second connection would be another one).
        self.write_on_loop = write_on_loop and _is_file(self.path)
        self._here: sqlite3.Connection | None = None
        self._unchecked = 0  # rows written on the loop since the last checkpoint
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowcraft-history")
        self._closed = False

    async def __aenter__(self) -> SqliteHistoryStore:
        await self._call(self._connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise HistoryError("the history store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------ on the store's thread

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        sql = self._sql
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql.meta_table)
            conn.execute(sql.put_version, (str(SCHEMA_VERSION),))
            (found,) = conn.execute(sql.get_version).fetchone()
            if found != str(SCHEMA_VERSION):
                conn.execute("ROLLBACK")
                raise HistoryError(
                    f"{self.path}: history schema version {found}, this flowcraft reads "
                    f"version {SCHEMA_VERSION}"
                )
            conn.execute(sql.events_table)
            conn.execute(sql.runs_table)
            conn.execute(sql.runs_index)
            conn.execute(sql.runs_updated_index)
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _write(self, events: list[HistoryEvent], conn: sqlite3.Connection | None = None) -> int:
        conn = conn or self._connection()
        events = cap_events(events, self.max_value_bytes)
        try:
            return self._insert(conn, events, rows_of(events, plain=True))
        except (UnicodeEncodeError, ValueError):
            # A lone surrogate (or a NUL) in an id, a key or the data: stored escaped.
            return self._insert(conn, events, rows_of(events, plain=False))

    def _insert(
        self, conn: sqlite3.Connection, events: list[HistoryEvent], rows: list[tuple[Any, ...]]
    ) -> int:
        runs = [(clean(r[0]), *r[1:]) for r in _run_rows(events)]
        conn.execute("BEGIN IMMEDIATE")
        try:
            before = conn.total_changes
            execute_rows(conn, self._sql.insert_events, rows)
            inserted = conn.total_changes - before
            execute_rows(conn, self._sql.upsert_runs, runs)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return inserted

    def _events_of(self, run_id: str) -> list[HistoryEvent]:
        rows = self._connection().execute(self._sql.select_events, (clean(run_id),)).fetchall()
        return [
            HistoryEvent(
                run_id=r[1],
                kind=r[3],
                key=r[2],
                node_id=r[4],
                activation=r[5],
                attempt=r[6],
                data=loads_data(r[9]),
                at=r[7],
                worker=r[8],
                seq=r[0],
            )
            for r in rows
        ]

    def _runs_of(self, limit: int, status: str | None) -> list[RunSummary]:
        conn = self._connection()
        if status is None:
            rows = conn.execute(self._sql.select_runs, (limit,)).fetchall()
        else:
            rows = conn.execute(self._sql.select_runs_of, (status, limit)).fetchall()
        return [RunSummary(r[0], r[1], r[2] or "running", r[3], r[4]) for r in rows]

    def _purge(self, selection: Selection, dry_run: bool, batch_size: int) -> PurgeResult:
        conn = self._connection()
        st = purge_statements(_DIALECT, self._sql.tables, selection)
        kept = 0
        if not selection.include_unfinished:
            (kept,) = conn.execute(st.count_unfinished, st.unfinished_args).fetchone()
        if dry_run:
            (runs,) = conn.execute(st.count_runs, st.args).fetchone()
            (events,) = conn.execute(st.count_events, st.args).fetchone()
            return PurgeResult(runs, events, kept, dry_run=True)
        runs = events = 0
        while True:
            batch = [r[0] for r in conn.execute(st.batch, (*st.args, batch_size)).fetchall()]
            if not batch:
                break
            ids = json.dumps(batch)
            while True:  # the batch's events, a chunk per transaction
                conn.execute("BEGIN IMMEDIATE")
                try:
                    deleted = conn.execute(st.delete_chunk, (ids, batch_size)).rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                events += deleted
                if deleted < batch_size:
                    break
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = [r[0] for r in conn.execute(st.delete_runs, (ids, *st.args)).fetchall()]
                events += conn.execute(st.delete_rest, (json.dumps(gone),)).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            runs += len(gone)
            if not gone:  # selected, then no longer selected: changed meanwhile
                logger.warning("history purge: %d runs changed while purged; kept", len(batch))
                break
        return PurgeResult(runs, events, kept)

    def _write_and_checkpoint(self, events: list[HistoryEvent]) -> int:
        """A write on the thread, then a checkpoint if the loop's connection (which
        never checkpoints: that may take long) wrote enough since the last one; done
        before the loop writes again, so the WAL starts over instead of growing."""
        inserted = self._write(events)
        if self._unchecked >= _CHECKPOINT_ROWS:
            self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._unchecked = 0
        return inserted

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ the store's API

    async def write(self, events: list[HistoryEvent]) -> int:
        """Insert each event unless its run holds its key already; update the runs."""
        if not events:
            return 0
        if self._here is not None and not self._closed and self._unchecked < _CHECKPOINT_ROWS:
            try:
                inserted = self._write(events, self._here)
            except sqlite3.OperationalError as exc:
                if not _busy(exc):
                    raise
            else:
                self._unchecked += len(events)
                await asyncio.sleep(0)  # a suspension point, as every other write has
                return inserted
        inserted = await self._call(self._write_and_checkpoint, events)
        if self.write_on_loop and self._here is None:
            self._here = _loop_connection(self.path)
        return inserted

    async def events(self, run_id: str) -> list[HistoryEvent]:
        """The run's events, oldest first (by the emitters' clocks, then store order)."""
        return await self._call(self._events_of, run_id)

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[RunSummary]:
        """The most recently started runs (of a status, if given)."""
        return await self._call(self._runs_of, limit, status)

    async def purge(
        self,
        *,
        older_than: timedelta | float | None = None,
        run_ids: Collection[str] | None = None,
        include_unfinished: bool = False,
        dry_run: bool = False,
        batch_size: int = 1000,
        now: float | None = None,
    ) -> PurgeResult:
        """Delete the history of runs whose last event is older than ``older_than`` (a
        timedelta or seconds), of the runs ``run_ids``, or of those of ``run_ids`` that
        are that old. Only finished runs (completed, failed, cancelled) unless
        ``include_unfinished``: a running, awaiting or stalled run keeps its events.
        ``dry_run`` counts without deleting. At most ``batch_size`` rows are deleted
        per transaction, so writers wait at most one batch. The file does not shrink
        (SQLite reuses the pages; ``VACUUM`` returns them)."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        selection = Selection.of(older_than, run_ids, include_unfinished, now)
        return await self._call(self._purge, selection, dry_run, batch_size)

    async def aclose(self) -> None:
        if self._closed:
            return
        if self._here is not None:
            self._here.close()
            self._here = None
        try:
            await self._call(self._close)
        finally:
            self._closed = True
            self._thread.shutdown(wait=True)


_CHECKPOINT_ROWS = 2000
"""Rows the loop's connection writes before a write goes to the thread to checkpoint
(about the 1000 pages of SQLite's own automatic checkpoint)."""


def _is_file(path: str) -> bool:
    return path not in ("", ":memory:") and "mode=memory" not in path


def _loop_connection(path: str) -> sqlite3.Connection:
    """The event loop's connection: it never waits for the file (timeout 0) and never
    checkpoints (the thread does)."""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    return conn


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the file (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _run_rows(events: list[HistoryEvent]) -> list[tuple[Any, ...]]:
    """One row per run in ``events``: blueprint, its latest status (and when), its
    first and last event time. A run without a status event here keeps its own."""
    runs: dict[str, list[Any]] = {}
    for e in events:
        row = runs.get(e.run_id)
        if row is None:
            row = runs[e.run_id] = [e.run_id, None, "", -1.0, e.at, e.at]
        row[1] = row[1] or blueprint_of(e)
        status = status_of(e)
        if status is not None and (not row[2] or later_status(row[2], row[3], status, e.at)):
            row[2], row[3] = status, max(row[3], e.at)
        row[4] = min(row[4], e.at)
        row[5] = max(row[5], e.at)
    return [tuple(r) for r in runs.values()]
