"""Cassandra: the driver behind asyncio, and the run store (a row per run and key).

The driver runs its own I/O thread; every request here is ``execute_async`` and
its ``ResponseFuture`` is bridged to an asyncio future with
``call_soon_threadsafe``, so the event loop never blocks on Cassandra. Every
statement is prepared once; run ids, keys and values are always bind values.

The state table, one partition per run (``ns`` keeps apps and tests apart)::

    ns text, run text, k text, v text, g int,  PRIMARY KEY ((ns, run), k)

``v`` is the key's value as JSON text. ``g`` is never written: a guard on a key
that the patch does not write is the condition of a ``DELETE g`` of that row,
which changes nothing visible.

Why a row per key: ``patch`` is ONE batch of ``UPDATE ... USING TTL`` and
``DELETE`` statements in the run's partition. A single-partition batch is one
mutation: atomic and isolated, and it costs the size of the delta, never of the
state. Statements in a batch share one timestamp and a delete wins a tie, so the
operations are first merged per key (the last one wins). ``get_many`` is one
``SELECT ... k IN ?``.

The guarded patch is the same batch made conditional (a lightweight transaction):
each guard key's statement carries ``IF v = ?`` (``null`` for an absent key), so
the check and the write are one Paxos round in one request. A timeout of a
lightweight transaction leaves its outcome unknown (it may still be applied):
:class:`PatchOutcomeUnknownError` says so, and the job is delivered again; the
protocol reads the state afresh then (a committed activation is a duplicate).

Timestamps. Cassandra orders writes of a cell by timestamp, and by default the
driver stamps writes with the *client's* clock: a worker whose clock runs behind
would write a later value that an earlier, ahead-of-time write hides. The session
here sends no client timestamps (``use_client_timestamp = False``), so the
coordinator stamps each write; a lightweight transaction is stamped by its Paxos
ballot, which the same node takes from the same strictly increasing clock. Token-
aware routing without shuffling sends every request of a run to the first
replica of its partition, so one run's writes are ordered by one clock whatever
the workers' clocks say (``tests/test_context.py`` forces skewed client clocks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flowcraft.context import Guard, PatchOperation, check_guard
from flowcraft.errors import FlowcraftError, StateLimitError
from flowcraft.serializer import JsonSerializer, check_key, encode_value
from flowcraft_kafka._settings import CassandraSettings

if TYPE_CHECKING:
    from cassandra.cluster import Cluster, ResponseFuture, Session
    from cassandra.query import PreparedStatement

__all__ = [
    "DEFAULT_MAX_PATCH_BYTES",
    "MAX_KEY_BYTES",
    "CassandraClient",
    "CassandraRunStore",
    "PatchOutcomeUnknownError",
    "create_schema",
]

logger = logging.getLogger("flowcraft.kafka.cassandra")

_json = JsonSerializer()

#: A clustering key holds at most 64 KiB - 1 bytes.
MAX_KEY_BYTES = 65_535
#: A mutation must fit half a commit-log segment (16 MiB by default) and a request
#: the native protocol's frame (16 MiB): keep a patch well below both.
DEFAULT_MAX_PATCH_BYTES = 12 * 1024 * 1024
#: Keys per ``IN`` list (Cassandra reads a long IN list on one coordinator).
_IN_CHUNK = 100


class PatchOutcomeUnknownError(FlowcraftError):
    """A guarded patch timed out: it may or may not have been applied. The job is
    handed back; its redelivery reads the state and finds out."""


class CassandraClient:
    """A driver ``Cluster`` and ``Session`` whose requests are awaited on asyncio.

    Create with :meth:`connect`; :meth:`aclose` shuts the cluster down. Counts the
    requests it sends (``requests``) for benchmarks.
    """

    def __init__(self, settings: CassandraSettings, cluster: Cluster, session: Session) -> None:
        self.settings = settings
        self.cluster = cluster
        self.session = session
        self.requests = 0
        self._prepared: dict[str, PreparedStatement] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(contact_points={self.settings.contact_points!r}, "
            f"keyspace={self.settings.keyspace!r})"
        )

    @classmethod
    async def connect(cls, settings: CassandraSettings) -> CassandraClient:
        """Connect (in a thread: the driver's connect blocks)."""
        return await asyncio.to_thread(cls._connect_sync, settings)

    @classmethod
    def _connect_sync(cls, settings: CassandraSettings) -> CassandraClient:
        from cassandra import ConsistencyLevel
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import (
            DCAwareRoundRobinPolicy,
            ExponentialReconnectionPolicy,
            TokenAwarePolicy,
        )
        from cassandra.query import tuple_factory

        profile = ExecutionProfile(
            load_balancing_policy=TokenAwarePolicy(
                DCAwareRoundRobinPolicy(local_dc=settings.local_datacenter),
                shuffle_replicas=False,
            ),
            consistency_level=ConsistencyLevel.name_to_value[settings.consistency],
            serial_consistency_level=ConsistencyLevel.name_to_value[settings.serial_consistency],
            request_timeout=settings.request_timeout,
            row_factory=tuple_factory,
        )
        options: dict[str, Any] = {
            "port": settings.port,
            "protocol_version": settings.protocol_version,
            "execution_profiles": {EXEC_PROFILE_DEFAULT: profile},
            "connect_timeout": 10.0,
            # Find a restarted node within seconds (the driver's default waits up to
            # ten minutes between attempts).
            "reconnection_policy": ExponentialReconnectionPolicy(0.5, 10.0),
        }
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else ""
            options["auth_provider"] = PlainTextAuthProvider(settings.username, password)
        if settings.ssl_context is not None:
            options["ssl_context"] = settings.ssl_context
        options.update(settings.cluster_options)
        cluster = Cluster(list(settings.contact_points), **options)
        try:
            session = cluster.connect()
        except Exception:
            cluster.shutdown()
            raise
        # The coordinator stamps writes (see the module docstring): client clocks
        # never order a run's writes.
        session.use_client_timestamp = False
        logger.debug("connected to cassandra %s", settings.contact_points)
        return cls(settings, cluster, session)

    async def prepare(self, cql: str) -> PreparedStatement:
        """A prepared statement (prepared once per client, in a thread)."""
        found = self._prepared.get(cql)
        if found is None:
            found = await asyncio.to_thread(self.session.prepare, cql)
            self._prepared[cql] = found
        return found

    async def execute(self, statement: Any, params: Sequence[Any] | None = None) -> list[Any]:
        """Run a statement; every page of its rows, as tuples. While no host is up (a
        restart), the request, which was then never sent, waits for one and is sent
        again, for up to ``request_timeout``."""
        from cassandra.cluster import NoHostAvailable

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout
        pause = 0.1
        while True:
            try:
                return await self._execute_once(statement, params)
            except NoHostAvailable as exc:
                sent_to = exc.errors if isinstance(exc.errors, dict) else {}
                if sent_to or loop.time() + pause > deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _execute_once(self, statement: Any, params: Sequence[Any] | None) -> list[Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Any]] = loop.create_future()
        rows: list[Any] = []
        self.requests += 1
        response: ResponseFuture = self.session.execute_async(statement, params)

        def on_page(page: Sequence[Any]) -> None:
            if page:
                rows.extend(page)
            if response.has_more_pages:
                self.requests += 1
                response.start_fetching_next_page()
            else:
                loop.call_soon_threadsafe(_resolve, done, rows)

        def on_error(exc: BaseException) -> None:
            loop.call_soon_threadsafe(_reject, done, exc)

        response.add_callbacks(on_page, on_error)
        return await done

    async def execute_schema(self, cql: str) -> None:
        """A schema statement (waits for schema agreement, so in a thread)."""
        self.requests += 1
        await asyncio.to_thread(self.session.execute, cql, timeout=120.0)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.cluster.shutdown)


def _resolve(future: asyncio.Future[list[Any]], rows: list[Any]) -> None:
    if not future.done():
        future.set_result(rows)


def _reject(future: asyncio.Future[list[Any]], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _table(settings: CassandraSettings) -> str:
    return f"{settings.keyspace}.{settings.table_prefix}_state"


async def create_schema(
    client: CassandraClient,
    *,
    replication: Mapping[str, Any] | None = None,
) -> None:
    """Create the keyspace (if missing, with ``replication``: default SimpleStrategy
    RF 1, for tests) and the state table. Idempotent."""
    settings = client.settings
    state = _table(settings)
    repl = dict(replication or {"class": "SimpleStrategy", "replication_factor": 1})
    # Replication options are configuration: rendered as CQL literals, quotes doubled.
    literal = ", ".join(
        f"'{str(k).replace(chr(39), chr(39) * 2)}': '{str(v).replace(chr(39), chr(39) * 2)}'"
        for k, v in repl.items()
    )
    await client.execute_schema(
        f"CREATE KEYSPACE IF NOT EXISTS {settings.keyspace} WITH replication = {{{literal}}}"
    )
    await client.execute_schema(
        f"CREATE TABLE IF NOT EXISTS {state} ("
        "ns text, run text, k text, v text, g int, PRIMARY KEY ((ns, run), k))"
    )


# Statement templates. The only substitution is ``{state}``: the table name from
# CassandraSettings (validated identifiers). Everything else is a bind marker.
_TEMPLATES: dict[str, str] = {
    "get": "SELECT v FROM {state} WHERE ns = ? AND run = ? AND k = ?",
    "get_many": "SELECT k, v FROM {state} WHERE ns = ? AND run = ? AND k IN ?",
    "get_all": "SELECT k, v FROM {state} WHERE ns = ? AND run = ?",
    "set": "UPDATE {state} USING TTL ? SET v = ? WHERE ns = ? AND run = ? AND k = ?",
    "delete": "DELETE FROM {state} WHERE ns = ? AND run = ? AND k = ?",
    "set_if": "UPDATE {state} USING TTL ? SET v = ? WHERE ns = ? AND run = ? AND k = ? IF v = ?",
    "delete_if": "DELETE FROM {state} WHERE ns = ? AND run = ? AND k = ? IF v = ?",
    "check": "DELETE g FROM {state} WHERE ns = ? AND run = ? AND k = ? IF v = ?",
}
_READS = ("get", "get_many", "get_all")


class _Statements:
    """Every statement the store sends, prepared once per client."""

    get: PreparedStatement
    get_many: PreparedStatement
    get_all: PreparedStatement
    set: PreparedStatement
    delete: PreparedStatement
    set_if: PreparedStatement
    delete_if: PreparedStatement
    check: PreparedStatement

    @classmethod
    async def prepare(cls, client: CassandraClient) -> _Statements:
        state = _table(client.settings)
        made = cls()
        for name, template in _TEMPLATES.items():
            statement = await client.prepare(template.format(state=state))
            statement.is_idempotent = name in _READS
            setattr(made, name, statement)
        return made


class CassandraRunStore:
    """The run state of one namespace, on a :class:`CassandraClient`.

    Args:
        client: a connected client (shared; the store never closes it), or a coroutine
            function that connects one on first use.
        namespace: the ``ns`` partition component (apps and tests apart).
        ttl_seconds: every write expires this long after it was made.
        max_patch_bytes: keys plus values of one patch; more is a ``StateLimitError``.
    """

    def __init__(
        self,
        client: CassandraClient | Callable[[], Awaitable[CassandraClient]],
        namespace: str = "flowcraft",
        *,
        ttl_seconds: float = 7 * 24 * 3600,
        max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
    ) -> None:
        if isinstance(client, CassandraClient):
            self._client: CassandraClient | None = client
            self._connect: Callable[[], Awaitable[CassandraClient]] | None = None
        else:
            self._client, self._connect = None, client
        self.namespace = namespace
        self.ttl = max(1, min(int(ttl_seconds), 630_720_000))  # Cassandra's TTL ceiling: 20 y
        self.max_patch_bytes = max_patch_bytes
        self._statements: _Statements | None = None
        self._preparing = asyncio.Lock()
        self._retry_at = 0.0
        self._backoff = 0.5

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r})"

    @property
    def client(self) -> CassandraClient:
        """The connected client (after the first request, when connected lazily)."""
        if self._client is None:
            raise RuntimeError("the store has not connected yet")
        return self._client

    async def connected(self) -> CassandraClient:
        """The client, connected first when the store connects lazily. After a failed
        connection, requests fail at once for a while (1 s, doubling to 30 s) instead
        of each trying a new connection."""
        if self._client is None:
            async with self._preparing:
                if self._client is None:
                    assert self._connect is not None
                    loop = asyncio.get_running_loop()
                    if loop.time() < self._retry_at:
                        raise ConnectionError(
                            "cassandra is unreachable (the last connection attempt failed)"
                        )
                    try:
                        self._client = await self._connect()
                    except Exception:
                        self._backoff = min(self._backoff * 2, 30.0)
                        self._retry_at = loop.time() + self._backoff
                        raise
        return self._client

    async def statements(self) -> _Statements:
        """The prepared statements (prepared on first use)."""
        if self._statements is None:
            client = await self.connected()
            async with self._preparing:
                if self._statements is None:
                    self._statements = await _Statements.prepare(client)
        return self._statements

    # ------------------------------------------------------------ reads

    async def get(self, run_id: str, key: str) -> Any:
        s = await self.statements()
        rows = await self.client.execute(s.get, (self.namespace, run_id, key))
        if not rows or rows[0][0] is None:
            return None
        return _json.loads(rows[0][0])

    async def get_many(self, run_id: str, keys: Sequence[str]) -> dict[str, Any]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        s = await self.statements()
        chunks = [wanted[i : i + _IN_CHUNK] for i in range(0, len(wanted), _IN_CHUNK)]
        pages = await asyncio.gather(
            *(self.client.execute(s.get_many, (self.namespace, run_id, c)) for c in chunks)
        )
        return {k: _json.loads(v) for page in pages for k, v in page if v is not None}

    async def to_dict(self, run_id: str) -> dict[str, Any]:
        s = await self.statements()
        rows = await self.client.execute(s.get_all, (self.namespace, run_id))
        return {k: _json.loads(v) for k, v in rows if v is not None}

    # ------------------------------------------------------------ the patch

    async def patch(
        self,
        run_id: str,
        ops: Sequence[PatchOperation],
        guard: Guard | None = None,
    ) -> bool:
        """Apply ``ops`` in one batch of the run's partition; with ``guard``, as one
        lightweight transaction that writes nothing unless every guard key holds its
        expected value (``None``: absent). True if applied."""
        from cassandra import OperationTimedOut, WriteTimeout
        from cassandra.query import BatchStatement, BatchType

        check_guard(guard)
        net = _merge(ops)
        encoded = self._encode(run_id, net)
        if not encoded and not guard:
            return True
        s = await self.statements()
        ns = self.namespace
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for key, text in encoded.items():
            if guard is not None and key in guard:
                expected = _guard_text(guard[key])
                if text is None:
                    batch.add(s.delete_if, (ns, run_id, key, expected))
                else:
                    batch.add(s.set_if, (self.ttl, text, ns, run_id, key, expected))
            elif text is None:
                batch.add(s.delete, (ns, run_id, key))
            else:
                batch.add(s.set, (self.ttl, text, ns, run_id, key))
        for key, value in (guard or {}).items():
            if key not in encoded:
                _check_key(run_id, key)
                batch.add(s.check, (ns, run_id, key, _guard_text(value)))
        if not guard:
            await self.client.execute(batch)
            return True
        try:
            rows = await self.client.execute(batch)
        except (WriteTimeout, OperationTimedOut) as exc:
            raise PatchOutcomeUnknownError(
                f"run {run_id!r}: the guarded patch timed out and may or may not have been "
                f"applied ({type(exc).__name__})"
            ) from exc
        return bool(rows and rows[0][0])

    def _encode(self, run_id: str, net: Mapping[str, PatchOperation]) -> dict[str, str | None]:
        """JSON text per key (None: delete), checked against the store's limits."""
        encoded: dict[str, str | None] = {}
        total = 0
        biggest = ("", 0)
        for key, op in net.items():
            size = _check_key(run_id, key)
            text = None if op.op == "delete" else encode_value(key, op.value)
            if text is not None:
                size += len(text.encode("utf-8"))
            total += size
            if size > biggest[1]:
                biggest = (key, size)
            encoded[key] = text
        if total > self.max_patch_bytes:
            raise StateLimitError(
                f"run {run_id!r}: a patch of {total} bytes exceeds the Cassandra store's "
                f"limit of {self.max_patch_bytes} bytes (largest: key {_short(biggest[0])} "
                f"with {biggest[1]} bytes)"
            )
        return encoded


def _merge(ops: Sequence[PatchOperation]) -> dict[str, PatchOperation]:
    """The net operation per key: the last one wins (a batch cannot order them)."""
    net: dict[str, PatchOperation] = {}
    for op in ops:
        net.pop(op.key, None)
        net[op.key] = op
    return net


def _check_key(run_id: str, key: str) -> int:
    """The key's size in bytes, or an error if Cassandra cannot hold it."""
    check_key(key)
    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise StateLimitError(
            f"run {run_id!r}: context key {_short(key)} is {size} bytes; Cassandra keys "
            f"hold at most {MAX_KEY_BYTES}"
        )
    return size


def _guard_text(expected: int | str | None) -> str | None:
    """The stored JSON text a guard value matches (None: the key is absent). Values
    are stored as compact JSON, so an int or str matches exactly its own text."""
    return None if expected is None else _json.dumps(expected)


def _short(key: str, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else f"{text[:limit]}...' ({len(key)} characters)"
