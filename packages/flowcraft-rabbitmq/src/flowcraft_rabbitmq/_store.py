"""PostgreSQL run store: one row per run, the state in one ``jsonb`` column.

Every statement has constant text (only the validated, quoted table names of
:class:`~flowcraft_rabbitmq._settings.SqlNames` are formatted in, once, at
construction). Run ids, context keys and values are always bind parameters, and
values cross as JSON text cast to ``jsonb`` in SQL, so a pool with custom type
codecs cannot change how they are encoded.

Values are kept exactly: ``jsonb`` normalises numbers (``1e16`` came back as the int
``10000000000000000``, ``1e308`` as ``10**308``), so the state object maps each
context key to a jsonb *string* holding the value's JSON text, as the core's
``encode_value`` wrote it (schema version 2; version 1 stored the values
themselves). The patch stays one statement over the keys it touches; the guard
compares the canonical JSON texts. The result is ``text`` for the same reason.

The table::

    run_id        text PRIMARY KEY
    state         jsonb        the run's context: {key: "<the value's JSON text>", ...}
    result        text         the published final result, JSON (wait_for_result reads it)
    created_at    timestamptz
    updated_at    timestamptz  every patch bumps it: the reconciler's progress marker
    finished_at   timestamptz  when the final result was published
    reconciled_at timestamptz  when a reconciler last claimed the run

plus a partial index on ``created_at`` over unfinished runs (``result IS NULL``),
which is the index of active runs the reconciler scans (not on ``updated_at``, so a
patch updates the row in place: see schema version 4), and a ``<table>_schema``
table recording the applied schema version for future migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from flowcraft.context import Guard, PatchOperation, check_guard
from flowcraft.distributed import keys as K
from flowcraft.distributed.results import ResultWaiters
from flowcraft.errors import SerializationError, StateLimitError
from flowcraft.serializer import JsonSerializer, check_key, encode_value
from flowcraft_rabbitmq._settings import SqlNames

__all__ = ["SCHEMA_VERSION", "PostgresRunStore"]

logger = logging.getLogger("flowcraft.rabbitmq.store")

READ_RETRY_SECONDS = 60.0
"""How long a read keeps trying while PostgreSQL is unreachable (a restart, a failover)."""

# A server that is down, restarting or dropped the connection: worth reading again.
_UNREACHABLE = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    # Seen once in CI right after a PostgreSQL restart, while the pool rebuilt its
    # connections: a pooled connection still busy from before ("cannot switch to
    # state 12; another operation is in progress"). A read is safe to try again.
    asyncpg.exceptions.InternalClientError,
)

_json = JsonSerializer()
# The state object's own encoding: keys and strings only, already checked.
_outer = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


# Statement templates. The only substitutions are ``{runs}``, ``{versions}``,
# ``{leases}`` and ``{index}``: identifiers from SqlNames, validated and quoted (see
# _settings).
# Run ids, keys and values are always $n parameters.

# Schema versions: the statements of version n are _MIGRATIONS[n - 1]. Append, never edit.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE IF NOT EXISTS {runs} (
            run_id text PRIMARY KEY,
            state jsonb NOT NULL DEFAULT '{{}}'::jsonb,
            result jsonb,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            finished_at timestamptz,
            reconciled_at timestamptz
        )""",
        "CREATE INDEX IF NOT EXISTS {index} ON {runs} (updated_at) WHERE result IS NULL",
    ),
    # 2: values as their exact JSON text (jsonb normalised numbers). Stop workers of
    # version 1 before upgrading: they would write values in the old form.
    (
        "ALTER TABLE {runs} ALTER COLUMN result TYPE text USING result::text",
        "UPDATE {runs} SET state = (SELECT coalesce(jsonb_object_agg(e.key, "
        "to_jsonb(e.value::text)), '{{}}'::jsonb) FROM jsonb_each(state) AS e)",
    ),
    # 3: activation leases beside the runs, so a job's admission reads its run and
    # takes its lease in one statement. Unlogged: no WAL, and a crash of the server
    # empties it, which only forgets leases (they save work; correctness never rests
    # on them). Keys and values are UTF-8 bytes (any text, NUL included).
    (
        "CREATE UNLOGGED TABLE IF NOT EXISTS {leases} ("
        "key bytea PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NOT NULL)",
    ),
    # 4: cheaper patches. (a) The index of unfinished runs on created_at instead of
    # updated_at: a patch (which bumps updated_at) then changes no indexed column, so
    # PostgreSQL can update the row in place on its page (a HOT update: no new index
    # entries), for which pages are left half free (fillfactor; new pages only). Before,
    # every patch inserted into both indexes (0 HOT updates in the benchmark). (b) A
    # state up to a page (toast_tuple_target) stays uncompressed in the row: from about
    # 2 KB (a diamond of 16 branches) every patch compressed the whole value and every
    # read decompressed it. PostgreSQL's CPU per job, A/B in the benchmark: chain about
    # -15% (a), diamond about -12% (b).
    (
        "ALTER TABLE {runs} SET (fillfactor = 50, toast_tuple_target = 8160)",
        "CREATE INDEX IF NOT EXISTS {unfinished_index} ON {runs} (created_at) WHERE result IS NULL",
        "DROP INDEX IF EXISTS {index_qualified}",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)

# Reads return each value's JSON text (``->>`` of a jsonb string is its content).
_GET = "SELECT state ->> $2 FROM {runs} WHERE run_id = $1"
_HAS = "SELECT state ? $2 FROM {runs} WHERE run_id = $1"
_GET_MANY = (
    "SELECT array_agg(k), array_agg(r.state ->> k) "
    "FROM {runs} AS r, unnest($2::text[]) AS k WHERE r.run_id = $1 AND r.state ? k"
)
_TO_DICT = (
    "SELECT array_agg(e.key), array_agg(e.value) "
    "FROM {runs} AS r, jsonb_each_text(r.state) AS e WHERE r.run_id = $1"
)
# The patch: delete the keys of the text[] $2 ("jsonb - text[]" removes top-level
# keys), then merge the object $3 of every key set ("||" replaces top-level keys),
# whose values are the JSON texts of the values set.
# The first patch of a run (start_run's) inserts the row.
_PATCH = (
    "INSERT INTO {runs} AS r (run_id, state) VALUES ($1, $3::text::jsonb) "
    "ON CONFLICT (run_id) DO UPDATE "
    "SET state = (r.state - $2::text[]) || $3::text::jsonb, updated_at = now()"
)
# The guarded patch of an existing row (every commit of a job): updated only if none
# of the keys of the text[] $4 exists and every key of the object $5 holds the same
# JSON text (the canonical text of an int or str guard). The UPDATE locks the row and
# checks the WHERE against its latest version, so the check and the write are one
# atomic step. Costs about 12 % less of PostgreSQL's CPU than the INSERT form below.
# Returns a row when applied.
_PATCH_GUARDED_ROW = (
    "UPDATE {runs} AS r SET state = (r.state - $2::text[]) || $3::text::jsonb, "
    "updated_at = now() WHERE r.run_id = $1 AND NOT (r.state ?| $4::text[]) "
    "AND NOT EXISTS (SELECT 1 FROM jsonb_each($5::text::jsonb) AS g(k, v) "
    "WHERE (r.state -> g.k) IS DISTINCT FROM g.v) "
    "RETURNING 1"
)
# The guarded patch, still one statement: an existing row is updated only if none of
# the keys of the text[] $4 exists and every key of the object $5 holds the same JSON
# text (the canonical text of an int or str guard). ON CONFLICT locks the row and
# checks its latest version, so the check and the write are one atomic step. A
# missing row is inserted only if $5 is empty (an absent key equals no value); a row
# inserted meanwhile meets the same conflict path.
# Returns a row when applied.
_PATCH_GUARDED = (
    "INSERT INTO {runs} AS r (run_id, state) "
    "SELECT $1, $3::text::jsonb WHERE $5::text::jsonb = '{{}}'::jsonb "
    "OR EXISTS (SELECT 1 FROM {runs} WHERE run_id = $1) "
    "ON CONFLICT (run_id) DO UPDATE "
    "SET state = (r.state - $2::text[]) || $3::text::jsonb, updated_at = now() "
    "WHERE NOT (r.state ?| $4::text[]) AND NOT EXISTS ("
    "SELECT 1 FROM jsonb_each($5::text::jsonb) AS g(k, v) "
    "WHERE (r.state -> g.k) IS DISTINCT FROM g.v) "
    "RETURNING 1"
)
# Write the result once and, in the same statement, NOTIFY the waiters (the
# notification is delivered when the statement's transaction commits).
_PUBLISH = (
    "WITH published AS ("
    "INSERT INTO {runs} AS r (run_id, result, finished_at) "
    "VALUES ($1, $2::text, now()) "
    "ON CONFLICT (run_id) DO UPDATE SET result = excluded.result, finished_at = now() "
    "WHERE r.result IS NULL RETURNING r.run_id) "
    "SELECT pg_notify($3, run_id) FROM published"
)
# A job's admission (the base's ``admit``, DISTRIBUTED.md steps 2-4) in one statement:
# $2-$4 the first read's keys (meta, status, the node's resolved count n); g = n + 1
# (NULL when n is not a small integer: the handler then reads by itself); the second
# read: the activation record ($5 || g || $6), the wait mark $7 and the likely inputs
# ($8 when g = 1, else $9); and, exactly when the run is of this blueprint version
# ($10, compared as jsonb), not final, and g has a record without a wait mark, the
# lease $11 || g for the holder $12 for $13 seconds, set-if-absent (an expired lease is
# absent; the same holder may take it again, so a retried statement is harmless).
# Keys are parameters; each value comes back as its JSON text.
_ADMIT = (
    "WITH s AS ("
    "SELECT r.state, r.state ->> $2 AS meta, r.state ->> $3 AS status, r.state ->> $4 AS n "
    "FROM {runs} AS r WHERE r.run_id = $1"
    "), g AS ("
    "SELECT s.*, CASE WHEN s.n IS NULL THEN 1 "
    "WHEN s.n ~ '^[0-9]{{1,9}}$' THEN s.n::int + 1 END AS g FROM s"
    "), a AS ("
    "SELECT g.meta, g.status, g.n, g.g, g.state ->> ($5 || g.g::text || $6) AS record, "
    "g.state ->> $7 AS waiting, "
    "ARRAY(SELECT g.state ->> u.k FROM unnest(CASE WHEN g.g = 1 THEN $8::text[] "
    "ELSE $9::text[] END) WITH ORDINALITY AS u(k, i) ORDER BY u.i) AS guesses, "
    "(g.g IS NOT NULL AND g.state ? ($5 || g.g::text || $6) AND NOT g.state ? $7 "
    "AND g.meta::jsonb = $10::jsonb "
    "AND coalesce(g.status::jsonb ->> 'status', '') "
    "NOT IN ('completed', 'failed', 'cancelled')) IS TRUE AS ok FROM g"
    "), l AS ("
    "INSERT INTO {leases} AS l (key, value, expires_at) "
    "SELECT $11::bytea || convert_to(a.g::text, 'UTF8'), $12::bytea, "
    "now() + make_interval(secs => $13) FROM a WHERE a.ok "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
    "WHERE l.expires_at <= now() OR l.value = excluded.value "
    "RETURNING 1"
    ") SELECT a.meta, a.status, a.n, a.g, a.record, a.waiting, a.guesses, "
    "CASE WHEN a.ok THEN EXISTS (SELECT 1 FROM l) END FROM a"
)
# The coordination operations on the leases table (``_coordination.PostgresLeases``);
# an expired row reads as absent everywhere.
_LEASE_GET = "SELECT value FROM {leases} WHERE key = $1 AND expires_at > now()"
_LEASE_SET_NX = (
    "INSERT INTO {leases} AS l (key, value, expires_at) "
    "VALUES ($1, $2, now() + make_interval(secs => $3)) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
    "WHERE l.expires_at <= now() RETURNING 1"
)
_LEASE_EXTEND = (
    "UPDATE {leases} SET expires_at = now() + make_interval(secs => $2) "
    "WHERE key = $1 AND expires_at > now() RETURNING 1"
)
_LEASE_INCREMENT = (
    "INSERT INTO {leases} AS l (key, value, expires_at) "
    "VALUES ($1, '\\x31'::bytea, now() + make_interval(secs => $2)) "
    "ON CONFLICT (key) DO UPDATE SET "
    "value = CASE WHEN l.expires_at <= now() THEN excluded.value "
    "ELSE convert_to((convert_from(l.value, 'UTF8')::bigint + 1)::text, 'UTF8') END, "
    "expires_at = CASE WHEN l.expires_at <= now() THEN excluded.expires_at "
    "ELSE l.expires_at END "
    "RETURNING convert_from(l.value, 'UTF8')::bigint"
)
_LEASE_DELETE = "DELETE FROM {leases} WHERE key = $1"
_LEASE_PURGE = "DELETE FROM {leases} WHERE expires_at <= now()"
_RESULT = "SELECT result, state ->> $2 FROM {runs} WHERE run_id = $1"
_CLAIM_STALLED = (
    "UPDATE {runs} AS r SET reconciled_at = now() WHERE r.run_id IN ("
    "SELECT run_id FROM {runs} "
    "WHERE result IS NULL AND updated_at < now() - make_interval(secs => $1) "
    "AND (reconciled_at IS NULL OR reconciled_at < now() - make_interval(secs => $1)) "
    "AND coalesce((state ->> $2)::jsonb ->> 'status', '') <> 'awaiting' "
    "ORDER BY updated_at LIMIT $3 FOR UPDATE SKIP LOCKED) "
    "RETURNING r.run_id"
)
_PURGE = (
    "DELETE FROM {runs} WHERE result IS NOT NULL "
    "AND finished_at < now() - make_interval(secs => $1)"
)
_VERSIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS {versions} ("
    "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)
_CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM {versions}"
_RECORD_VERSION = "INSERT INTO {versions} (version) VALUES ($1)"


class _Sql:
    """The statements for one table, formatted once."""

    def __init__(self, names: SqlNames) -> None:
        def bind(template: str) -> str:
            return template.format(
                runs=names.runs,
                versions=names.versions,
                index=names.active_index,
                index_qualified=names.active_index_qualified,
                unfinished_index=names.unfinished_index,
                leases=names.leases,
            )

        self.get = bind(_GET)
        self.has = bind(_HAS)
        self.get_many = bind(_GET_MANY)
        self.to_dict = bind(_TO_DICT)
        self.patch = bind(_PATCH)
        self.patch_guarded = bind(_PATCH_GUARDED)
        self.patch_guarded_row = bind(_PATCH_GUARDED_ROW)
        self.publish = bind(_PUBLISH)
        self.result = bind(_RESULT)
        self.admit = bind(_ADMIT)
        self.lease_get = bind(_LEASE_GET)
        self.lease_set_nx = bind(_LEASE_SET_NX)
        self.lease_extend = bind(_LEASE_EXTEND)
        self.lease_increment = bind(_LEASE_INCREMENT)
        self.lease_delete = bind(_LEASE_DELETE)
        self.lease_purge = bind(_LEASE_PURGE)
        self.claim_stalled = bind(_CLAIM_STALLED)
        self.purge = bind(_PURGE)
        self.versions_table = bind(_VERSIONS_TABLE)
        self.current_version = bind(_CURRENT_VERSION)
        self.record_version = bind(_RECORD_VERSION)
        self.migrations = [[bind(stmt) for stmt in version] for version in _MIGRATIONS]


@contextmanager
def _translated(run_id: str) -> Iterator[None]:
    """PostgreSQL's refusals of a value, as flowcraft's errors."""
    try:
        yield
    except asyncpg.exceptions.UntranslatableCharacterError as exc:
        raise SerializationError(
            f"run {run_id!r}: PostgreSQL jsonb cannot store this text "
            f"(a NUL character, \\u0000, in a key?): {exc}"
        ) from exc
    except asyncpg.exceptions.ProgramLimitExceededError as exc:
        raise StateLimitError(f"run {run_id!r}: the state is too large for a row: {exc}") from exc


async def _no_reset(connection: Any) -> None:
    """Release connections without asyncpg's reset query (a round trip per release).

    The store's statements leave no session state behind (no LISTEN, cursors,
    session advisory locks or SET), so its own pool has nothing to reset.
    """


def _alive(conn: Any) -> bool:
    """Whether a lane's connection is open. A lost one is taken back by asyncpg's
    pool, and its proxy then raises ``InterfaceError`` on every call."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False


def _check_pg_key(key: str) -> None:
    """A key PostgreSQL can hold: valid Unicode, and no NUL (jsonb keys cannot have one)."""
    check_key(key)
    if "\x00" in key:
        raise SerializationError(
            f"context key {key!r}: PostgreSQL jsonb keys cannot hold a NUL character (\\u0000)"
        )


def _decoded(row: Any) -> dict[str, Any]:
    """``{key: value}`` from a row of (keys, JSON texts) arrays (NULLs: none found)."""
    if row is None or row[0] is None:
        return {}
    loads = _json.loads
    return {key: loads(text) for key, text in zip(row[0], row[1], strict=True)}


def collapse(ops: Sequence[PatchOperation]) -> tuple[list[str], dict[str, Any]]:
    """A patch's net effect per key: (keys deleted, {key: value} set), disjoint.

    Operations apply in order, so the last one on a key decides; what remains is
    order-free (delete the deleted keys, then merge the set ones).
    """
    sets: dict[str, Any] = {}
    deletes: dict[str, None] = {}
    for op in ops:
        if op.op == "set":
            sets[op.key] = op.value
            deletes.pop(op.key, None)
        else:
            sets.pop(op.key, None)
            deletes[op.key] = None
    return list(deletes), sets


class PostgresRunStore:
    """Run states, final results and the active-run index in one PostgreSQL table.

    Args:
        pool: an ``asyncpg`` pool to use (it stays open after :meth:`aclose`).
        dsn: a ``postgresql://`` URL, used when no pool is given; the store creates
            and owns its pool.
        table: the runs table (the schema-version table is ``<table>_schema``).
        schema: the PostgreSQL schema of both tables (default: the search path).
        create_schema: create or migrate the tables on first use.
        lanes: with ``dsn``, up to this many of the pool's connections (leaving it
            two) are kept out of it as *lanes*, each used by one statement at a
            time: a statement on an idle lane costs a quarter of the Python calls of
            one through the pool (whose acquire and release start a task and a timer
            each). When every lane is busy, statements go through the pool. 0: none.
        **pool_kwargs: with ``dsn``, passed to ``asyncpg.create_pool`` (``ssl`` for
            TLS, ``min_size``, ``max_size``, ``statement_cache_size``, ...). The
            store's own pool skips asyncpg's reset query on release (nothing to
            reset); a given pool is used as configured.
    """

    def __init__(
        self,
        *,
        pool: Any = None,
        dsn: str | None = None,
        table: str = "flowcraft_runs",
        schema: str | None = None,
        create_schema: bool = True,
        lanes: int = 0,
        **pool_kwargs: Any,
    ) -> None:
        if (pool is None) == (dsn is None):
            raise ValueError("pass exactly one of pool= or dsn= for PostgreSQL")
        self.names = SqlNames.create(table, schema)
        self.sql = _Sql(self.names)
        self._pool: Any = pool
        self._owns_pool = pool is None
        self._dsn = dsn
        self._pool_kwargs = pool_kwargs
        self._create_schema = create_schema
        self._lanes_wanted = lanes if pool is None else 0  # a given pool stays shared
        self._lanes_max = 0
        self._lanes_taken = 0
        self._lanes: list[Any] = []
        """Every lane (connections taken out of the pool); ``_idle`` those free now."""
        self._idle: list[Any] = []
        self._ready = False
        self._lock = asyncio.Lock()
        self.notifications = _Notifications(self)
        self.round_trips: Counter[str] = Counter()
        """Statements sent, by kind (each is one round trip)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.names.runs})"  # never the DSN

    async def pool(self) -> Any:
        """The pool, created and the schema migrated on first use."""
        if self._ready:
            return self._pool
        async with self._lock:
            if not self._ready:
                if self._pool is None:
                    kwargs = {
                        "min_size": 1,
                        "max_size": 10,
                        "reset": _no_reset,
                        **self._pool_kwargs,
                    }
                    self._pool = await asyncpg.create_pool(self._dsn, **kwargs)
                    self._lanes_max = max(0, min(self._lanes_wanted, kwargs["max_size"] - 2))
                if self._create_schema:
                    await self.migrate()
                self._ready = True
        return self._pool

    async def migrate(self) -> int:
        """Create or upgrade the tables to :data:`SCHEMA_VERSION`; returns the version.

        An advisory lock serialises workers starting together. A database already
        at a newer version (a newer flowcraft-rabbitmq) is an error, not a downgrade.
        """
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.names.lock_name)
            await conn.execute(self.sql.versions_table)
            current = int(await conn.fetchval(self.sql.current_version))
            if current > SCHEMA_VERSION:
                raise RuntimeError(
                    f"table {self.names.runs} has schema version {current}; this "
                    f"flowcraft-rabbitmq knows up to {SCHEMA_VERSION}: upgrade it"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in self.sql.migrations[version - 1]:
                    await conn.execute(statement)
                await conn.execute(self.sql.record_version, version)
                logger.info("table %s migrated to schema version %d", self.names.runs, version)
        return SCHEMA_VERSION

    async def _call(self, method: str, query: str, *args: Any) -> Any:
        """``connection.<method>(query, *args)`` on an idle lane (see ``lanes``), else
        through the pool. A lane whose statement ended in anything but PostgreSQL's
        refusal (a lost connection, a cancellation) goes back to the pool, which
        cleans it up or drops it; a new lane replaces it later."""
        conn = None
        while self._idle:
            idle = self._idle.pop()
            if _alive(idle):
                conn = idle
                break
            await self._drop_lane(idle)  # lost while idle (a server restart)
        if conn is None:
            if self._lanes_taken >= self._lanes_max:
                pool = await self.pool()
                return await getattr(pool, method)(query, *args)
            conn = await self._new_lane()
        healthy = False
        try:
            result = await getattr(conn, method)(query, *args)
            healthy = True
            return result
        except asyncpg.PostgresError:
            healthy = True  # the server refused the statement; the connection is fine
            raise
        finally:
            if conn not in self._lanes:
                pass  # closed meanwhile (aclose gave it back)
            elif healthy and _alive(conn):
                self._idle.append(conn)
            else:
                await self._drop_lane(conn)

    async def _new_lane(self) -> Any:
        self._lanes_taken += 1  # before awaiting: callers at once never take more
        try:
            pool = await self.pool()
            conn = await pool.acquire()
        except BaseException:
            self._lanes_taken -= 1
            raise
        self._lanes.append(conn)
        return conn

    async def _drop_lane(self, conn: Any) -> None:
        self._lanes.remove(conn)
        self._lanes_taken -= 1
        pool = self._pool
        if pool is not None:
            try:
                await pool.release(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.debug("releasing a broken lane: %r", exc)

    async def _fetchval(self, kind: str, query: str, *args: Any) -> Any:
        return await self._read(kind, "fetchval", query, *args)

    async def _fetchrow(self, kind: str, query: str, *args: Any) -> Any:
        return await self._read(kind, "fetchrow", query, *args)

    async def _read(self, kind: str, method: str, query: str, *args: Any) -> Any:
        """A read, tried again while PostgreSQL is unreachable or restarting (for up to
        ``READ_RETRY_SECONDS``): a client waiting for a result, or a job, rides out a
        restart instead of failing. Only reads: they change nothing if repeated."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_RETRY_SECONDS
        pause = 0.1
        while True:
            try:
                self.round_trips[kind] += 1
                return await self._call(method, query, *args)
            except _UNREACHABLE as exc:
                if loop.time() + pause > deadline:
                    raise
                logger.info("PostgreSQL unreachable (%r); reading again in %.1f s", exc, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    async def get(self, run_id: str, key: str) -> Any:
        text = await self._fetchval("get", self.sql.get, run_id, key)
        return None if text is None else _json.loads(text)

    async def has(self, run_id: str, key: str) -> bool:
        return bool(await self._fetchval("has", self.sql.has, run_id, key))

    async def get_many(self, run_id: str, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        row = await self._fetchrow("get_many", self.sql.get_many, run_id, list(keys))
        return _decoded(row)

    async def to_dict(self, run_id: str) -> dict[str, Any]:
        row = await self._fetchrow("to_dict", self.sql.to_dict, run_id)
        return _decoded(row)

    async def patch(
        self, run_id: str, ops: Sequence[PatchOperation], guard: Guard | None = None
    ) -> bool:
        """Apply ``ops`` in one statement; with ``guard``, only if it holds (the check
        is part of the same statement). True if applied."""
        check_guard(guard)
        if not ops and not guard:
            return True
        deletes, sets = collapse(ops)
        # Every key and value is checked and encoded before anything is sent.
        for key in deletes:
            _check_pg_key(key)
        texts = {}
        for key, value in sets.items():
            texts[key] = encode_value(key, value)
            _check_pg_key(key)
        payload = _outer.encode(texts)
        self.round_trips["patch"] += 1
        with _translated(run_id):
            if not guard:
                await self._call("execute", self.sql.patch, run_id, deletes, payload)
                return True
            absent = [k for k, v in guard.items() if v is None]
            equal = {k: _json.dumps(v) for k, v in guard.items() if v is not None}
            args = (run_id, deletes, payload, absent, _outer.encode(equal))
            applied = await self._call("fetchval", self.sql.patch_guarded_row, *args)
            if applied is None and not equal:
                # No row, or the guard failed: only the INSERT form may insert the
                # row (an absent key equals no value). A second statement only here.
                self.round_trips["patch"] += 1
                applied = await self._call("fetchval", self.sql.patch_guarded, *args)
        return applied is not None

    async def admit(self, run_id: str, args: Sequence[Any]) -> Any:
        """One admission statement (``_ADMIT``; ``args`` are its $2...$13): the row of
        the run's first and second reads and whether the lease was taken, or None for a
        run that does not exist. Retried like a read while PostgreSQL is unreachable
        (the lease's holder may take it again)."""
        return await self._fetchrow("admit", self.sql.admit, run_id, *args)

    async def lease_call(self, kind: str, method: str, query: str, *args: Any) -> Any:
        """One statement on the leases table (``_coordination.PostgresLeases``)."""
        self.round_trips[kind] += 1
        return await self._call(method, query, *args)

    async def publish(self, run_id: str, result: dict[str, Any]) -> None:
        """Store the final result once (a later publication of the run changes nothing)."""
        self.round_trips["publish"] += 1
        with _translated(run_id):
            await self._call(
                "execute", self.sql.publish, run_id, _json.dumps(result), self.names.channel
            )

    async def result(self, run_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the published result, the run's status record); each None if absent."""
        row = await self._fetchrow("result", self.sql.result, run_id, K.STATUS)
        if row is None:
            return None, None
        published, status = row[0], row[1]
        return (
            None if published is None else _json.loads(published),
            None if status is None else _json.loads(status),
        )

    async def claim_stalled(self, older_than_seconds: float, limit: int) -> list[str]:
        """Unfinished, not-awaiting runs without progress for ``older_than_seconds`` that no
        reconciler claimed in that time; claims them (concurrent reconcilers skip them)."""
        pool = await self.pool()
        self.round_trips["claim_stalled"] += 1
        rows = await pool.fetch(
            self.sql.claim_stalled, float(older_than_seconds), K.STATUS, int(limit)
        )
        return [str(r[0]) for r in rows]

    async def purge_finished(self, older_than_seconds: float) -> int:
        """Delete runs whose result was published more than ``older_than_seconds`` ago."""
        pool = await self.pool()
        self.round_trips["purge"] += 1
        status: str = await pool.execute(self.sql.purge, float(older_than_seconds))
        return int(status.rsplit(" ", 1)[-1])

    async def aclose(self) -> None:
        """Close the pool this store created; a given pool stays open."""
        await self.notifications.close()
        lanes, self._lanes, self._idle = self._lanes, [], []
        self._lanes_taken = 0
        for conn in lanes:  # the pool closes only once every connection is back
            if self._pool is not None:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    await self._pool.release(conn)
        if self._owns_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None
            self._ready = False


class _Notifications:
    """One pooled connection LISTENing for published results, shared by every waiter.

    ``watch(run_id)`` returns an event set when the run's result is published. If
    the connection cannot be had, or is lost, waiters still poll (slower), so a
    notification is a shortcut, never a requirement.

    A lost connection (a PostgreSQL restart) is detected by its termination listener
    and never touched again: asyncpg's pool takes a lost connection back, and any
    call through its proxy after that raises ``InterfaceError`` ("released back to
    the pool"), which used to fail every later ``wait_for_result``. The next
    ``watch`` acquires a new connection.
    """

    def __init__(self, store: PostgresRunStore) -> None:
        self._store = store
        self._conn: Any = None
        self.waiters = ResultWaiters()
        self._lock = asyncio.Lock()
        self._lost = False

    @property
    def listening(self) -> bool:
        conn = self._conn
        if conn is None or self._lost:
            return False
        try:
            return not conn.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back: lost
            return False

    async def watch(self, run_id: str) -> asyncio.Event:
        event = self.waiters.add(run_id)
        if not self.listening:
            try:
                await self._listen()
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.info("cannot LISTEN for results (%r); waiters poll", exc)
        return event

    async def _listen(self) -> None:
        async with self._lock:
            if self.listening:
                return
            if self._conn is not None:  # lost: give it back (the pool discards it)
                await self._release()
            pool = await self._store.pool()
            conn = await pool.acquire()
            try:
                await conn.add_listener(self._store.names.channel, self._notified)
                conn.add_termination_listener(self._terminated)
            except BaseException:
                await pool.release(conn)
                raise
            self._conn = conn
            self._lost = False

    def _notified(self, conn: Any, pid: int, channel: str, run_id: str) -> None:
        self.waiters.wake(run_id)

    def _terminated(self, conn: Any) -> None:
        logger.info("the LISTEN connection for results was lost; waiters poll until a new one")
        self._lost = True
        # Wake every waiter: each checks for its result once now, instead of
        # sleeping out its backoff after missing a notification.
        self.waiters.wake_all()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        lost, self._lost = self._lost, False
        pool = self._store._pool
        if conn is None or pool is None:
            return
        try:
            if not lost and not conn.is_closed():
                await conn.remove_listener(self._store.names.channel, self._notified)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            logger.debug("UNLISTEN failed; the connection goes back anyway")
        try:
            await pool.release(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.debug("releasing the lost LISTEN connection: %r", exc)

    async def close(self) -> None:
        async with self._lock:
            await self._release()
