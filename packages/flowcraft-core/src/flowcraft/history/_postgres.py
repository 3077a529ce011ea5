"""PostgreSQL history, for a fleet whose workers run on several machines (the
``[postgres]`` extra: asyncpg, as flowcraft-rabbitmq uses)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from flowcraft.history._cap import DEFAULT_MAX_VALUE_BYTES, cap_events
from flowcraft.history._purge import Dialect, PurgeResult, Selection, purge_statements
from flowcraft.history._records import (
    SCHEMA_VERSION,
    HistoryError,
    HistoryEvent,
    RunSummary,
    Statements,
    check_name,
    clean,
    loads_data,
    rows_of,
)
from flowcraft.history._sqlite import _run_rows

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]

__all__ = ["PostgresHistoryStore"]

logger = logging.getLogger("flowcraft.history")

_POSTGRES = {
    "lock": "SELECT pg_advisory_xact_lock(hashtext($1))",
    "meta_table": "CREATE TABLE IF NOT EXISTS {meta} (name TEXT PRIMARY KEY, value TEXT)",
    "put_version": "INSERT INTO {meta} (name, value) VALUES ('schema_version', $1) "
    "ON CONFLICT (name) DO NOTHING",
    "get_version": "SELECT value FROM {meta} WHERE name = 'schema_version'",
    "events_table": "CREATE TABLE IF NOT EXISTS {events} ("
    "seq BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, event_key TEXT NOT NULL, "
    "kind TEXT NOT NULL, node_id TEXT, activation INTEGER, attempt INTEGER, "
    "at DOUBLE PRECISION NOT NULL, worker TEXT NOT NULL, data TEXT NOT NULL, "
    "UNIQUE (run_id, event_key))",
    "runs_table": "CREATE TABLE IF NOT EXISTS {runs} ("
    "run_id TEXT PRIMARY KEY, blueprint_id TEXT, status TEXT NOT NULL, "
    "status_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL)",
    "runs_index": "CREATE INDEX IF NOT EXISTS {runs}_started ON {runs} (started_at)",
    # A purge picks runs by their last event's time.
    "runs_updated_index": "CREATE INDEX IF NOT EXISTS {runs}_updated ON {runs} (updated_at)",
    # One statement per batch: each column an array parameter.
    "insert_events": "INSERT INTO {events} (run_id, event_key, kind, node_id, activation, "
    "attempt, at, worker, data) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
    "$4::text[], $5::int[], $6::int[], $7::float8[], $8::text[], $9::text[]) "
    "ON CONFLICT (run_id, event_key) DO NOTHING",
    "upsert_runs": "INSERT INTO {runs} AS r (run_id, blueprint_id, status, status_at, "
    "started_at, updated_at) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
    "$4::float8[], $5::float8[], $6::float8[]) "
    "ON CONFLICT (run_id) DO UPDATE SET "
    "blueprint_id = COALESCE(r.blueprint_id, excluded.blueprint_id), "
    "{status_case}, "
    "status_at = GREATEST(r.status_at, excluded.status_at), "
    "started_at = LEAST(r.started_at, excluded.started_at), "
    "updated_at = GREATEST(r.updated_at, excluded.updated_at)",
    "select_events": "SELECT seq, run_id, event_key, kind, node_id, activation, attempt, at, "
    "worker, data FROM {events} WHERE run_id = $1 ORDER BY at, seq",
    "select_runs": "SELECT run_id, blueprint_id, status, started_at, updated_at FROM {runs} "
    "ORDER BY started_at DESC LIMIT $1",
    "select_runs_of": "SELECT run_id, blueprint_id, status, started_at, updated_at FROM {runs} "
    "WHERE status = $1 ORDER BY started_at DESC LIMIT $2",
    "drop": "DROP TABLE IF EXISTS {events}, {runs}, {meta}",
}


_DIALECT = Dialect(param=lambda n: f"${n}", in_ids="run_id = ANY({p}::text[])", ids=list)


def _count(status: str) -> int:
    """The row count of a command's status (``DELETE 12``)."""
    return int(status.rsplit(" ", 1)[-1])


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover (the extra is installed in CI)
        raise ImportError(
            'PostgresHistoryStore needs asyncpg: pip install "flowcraft-core[postgres]"'
        ) from exc
    return asyncpg


class PostgresHistoryStore:
    """History in PostgreSQL tables (``<prefix>_events``, ``_runs``, ``_meta``),
    created on first use. ``pool_options`` go to ``asyncpg.create_pool`` unchanged
    (``ssl`` and the rest of the TLS settings among them); or give a ``pool``.
    ``max_value_bytes`` caps each stored value as :class:`SqliteHistoryStore` does."""

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        table_prefix: str = "flowcraft_history",
        max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES,
        **pool_options: Any,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise ValueError("give a dsn or a pool")
        if max_value_bytes is not None and max_value_bytes < 1:
            raise ValueError("max_value_bytes must be at least 1 (or None: no cap)")
        self.max_value_bytes = max_value_bytes
        self._dsn = dsn
        self._pool: Any = pool
        self._owned = pool is None
        self._pool_options = pool_options
        self._sql = Statements(_POSTGRES, check_name(table_prefix))
        self._ready = False

    def __repr__(self) -> str:  # the DSN may hold a password: never shown
        return f"PostgresHistoryStore(tables={self._sql.tables['events']!r}, ...)"

    async def __aenter__(self) -> PostgresHistoryStore:
        await self._connection_pool()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _connection_pool(self) -> Any:
        if self._pool is None:
            self._pool = await _asyncpg().create_pool(
                self._dsn, min_size=1, max_size=4, **self._pool_options
            )
        if not self._ready:
            await self._create()
            self._ready = True
        return self._pool

    async def _create(self) -> None:
        sql = self._sql
        async with self._pool.acquire() as conn, conn.transaction():
            # Several workers may start at once: one creates, the others wait.
            await conn.execute(sql.lock, sql.tables["meta"])
            await conn.execute(sql.meta_table)
            await conn.execute(sql.put_version, str(SCHEMA_VERSION))
            found = await conn.fetchval(sql.get_version)
            if found != str(SCHEMA_VERSION):
                raise HistoryError(
                    f"history schema version {found} in {sql.tables['meta']}, this flowcraft "
                    f"reads version {SCHEMA_VERSION}"
                )
            await conn.execute(sql.events_table)
            await conn.execute(sql.runs_table)
            await conn.execute(sql.runs_index)
            await conn.execute(sql.runs_updated_index)

    async def write(self, events: list[HistoryEvent]) -> int:
        """Insert each event unless its run holds its key already (one statement for
        the batch), and update the runs, in one transaction."""
        if not events:
            return 0
        pool = await self._connection_pool()
        events = cap_events(events, self.max_value_bytes)
        columns = [list(c) for c in zip(*rows_of(events, plain=False), strict=True)]
        runs = list(zip(*_run_rows(events), strict=True))
        runs[0] = tuple(clean(r) for r in runs[0])
        async with pool.acquire() as conn, conn.transaction():
            status = await conn.execute(self._sql.insert_events, *columns)
            await conn.execute(self._sql.upsert_runs, *(list(c) for c in runs))
        return _count(status)

    async def events(self, run_id: str) -> list[HistoryEvent]:
        """The run's events, oldest first (by the emitters' clocks, then store order)."""
        pool = await self._connection_pool()
        rows = await pool.fetch(self._sql.select_events, clean(run_id))
        return [
            HistoryEvent(
                run_id=r["run_id"],
                kind=r["kind"],
                key=r["event_key"],
                node_id=r["node_id"],
                activation=r["activation"],
                attempt=r["attempt"],
                data=loads_data(r["data"]),
                at=r["at"],
                worker=r["worker"],
                seq=r["seq"],
            )
            for r in rows
        ]

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[RunSummary]:
        """The most recently started runs (of a status, if given)."""
        pool = await self._connection_pool()
        if status is None:
            rows = await pool.fetch(self._sql.select_runs, limit)
        else:
            rows = await pool.fetch(self._sql.select_runs_of, status, limit)
        return [
            RunSummary(r["run_id"], r["blueprint_id"], r["status"] or "running", r[3], r[4])
            for r in rows
        ]

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
        """Delete the history of old runs, of given runs, or of given runs that are
        old, as :meth:`SqliteHistoryStore.purge` does: finished runs only unless
        ``include_unfinished``, at most ``batch_size`` rows per transaction."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        selection = Selection.of(older_than, run_ids, include_unfinished, now)
        pool = await self._connection_pool()
        st = purge_statements(_DIALECT, self._sql.tables, selection)
        kept = 0
        if not selection.include_unfinished:
            kept = await pool.fetchval(st.count_unfinished, *st.unfinished_args)
        if dry_run:
            runs = await pool.fetchval(st.count_runs, *st.args)
            events = await pool.fetchval(st.count_events, *st.args)
            return PurgeResult(runs, events, kept, dry_run=True)
        runs = events = 0
        while True:
            batch = [r[0] for r in await pool.fetch(st.batch, *st.args, batch_size)]
            if not batch:
                break
            while True:  # the batch's events, a chunk per transaction
                deleted = _count(await pool.execute(st.delete_chunk, batch, batch_size))
                events += deleted
                if deleted < batch_size:
                    break
            async with pool.acquire() as conn, conn.transaction():
                gone = [r[0] for r in await conn.fetch(st.delete_runs, batch, *st.args)]
                events += _count(await conn.execute(st.delete_rest, gone))
            runs += len(gone)
            if not gone:  # selected, then no longer selected: changed meanwhile
                logger.warning("history purge: %d runs changed while purged; kept", len(batch))
                break
        return PurgeResult(runs, events, kept)

    async def drop(self) -> None:
        """Drop the history tables (tests; a fresh start)."""
        pool = await self._connection_pool()
        await pool.execute(self._sql.drop)
        self._ready = False

    async def aclose(self) -> None:
        if self._owned and self._pool is not None:
            await self._pool.close()
            self._pool = None
