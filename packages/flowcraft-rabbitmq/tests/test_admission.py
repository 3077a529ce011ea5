"""The round trips this adapter saves: leases beside the runs, the admission in one
statement, and what a node job costs in PostgreSQL statements.

The conformance kit wraps every context it hands the base (to inject faults), so the
adapter's own admission never runs there; these tests hold it to the base's reads and
lease decision directly, and pin its cost."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from flowcraft import Flow, NodeContext, PatchOperation, RuntimeOptions
from flowcraft._analysis import analyse
from flowcraft.distributed import Admission, JobPayload
from flowcraft.distributed import keys as K
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.testing import CoordinationStoreTests
from flowcraft_rabbitmq import PostgresContext, PostgresRunStore, RabbitMQAdapter
from flowcraft_rabbitmq._coordination import PostgresLeases

from .conftest import Backends, Namespace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def lease_table(backends: Backends) -> Iterator[str]:
    """One runs table (and leases table) for this module's stores, dropped at its end."""
    table = f"fc_lease_{uuid.uuid4().hex[:12]}"
    yield table
    names = PostgresRunStore(dsn=backends.postgres_dsn, table=table).names

    async def drop() -> None:
        conn = await asyncpg.connect(backends.postgres_dsn)
        try:
            await conn.execute(
                f"DROP TABLE IF EXISTS {names.runs}, {names.versions}, {names.leases}"
            )
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.fixture
async def run_store(backends: Backends, lease_table: str) -> AsyncIterator[PostgresRunStore]:
    store = PostgresRunStore(dsn=backends.postgres_dsn, table=lease_table, max_size=4)
    try:
        yield store
    finally:
        await store.aclose()


class _Prefixed:
    """One namespace of a shared ``PostgresLeases`` (the kit's isolation check)."""

    def __init__(self, inner: PostgresLeases, prefix: str) -> None:
        self.inner, self.prefix = inner, prefix

    async def increment(self, key: str, ttl_seconds: float) -> int:
        return await self.inner.increment(self.prefix + key, ttl_seconds)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        return await self.inner.set_if_not_exist(self.prefix + key, value, ttl_seconds)

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        return await self.inner.extend_ttl(self.prefix + key, ttl_seconds)

    async def delete(self, key: str) -> None:
        await self.inner.delete(self.prefix + key)

    async def get(self, key: str) -> str | None:
        return await self.inner.get(self.prefix + key)


class TestPostgresLeases(CoordinationStoreTests):
    """The leases table is a whole coordination store (the adapter sends it leases)."""

    short_ttl_seconds = 0.3
    ttl_resolution_seconds = 0.2

    @pytest.fixture
    def store(self, run_store: PostgresRunStore) -> CoordinationStore:
        return _Prefixed(PostgresLeases(run_store), f"{uuid.uuid4().hex}:")

    @pytest.fixture
    def other_store(self, run_store: PostgresRunStore) -> CoordinationStore:
        return _Prefixed(PostgresLeases(run_store), f"{uuid.uuid4().hex}:")


async def test_expired_leases_are_purged(run_store: PostgresRunStore) -> None:
    leases = PostgresLeases(run_store)
    await asyncio.sleep(0.3)
    await leases.purge_expired()  # what other tests left
    assert await leases.set_if_not_exist("short", "x", 0.05)
    assert await leases.set_if_not_exist("long", "y", 60)
    await asyncio.sleep(0.1)
    assert await leases.purge_expired() == 1
    assert await leases.get("long") == "y"


# ---------------------------------------------------------------------- admission


def _flow() -> Flow:
    async def step(ctx: NodeContext) -> Any:
        return ctx.input

    return Flow("adm").node("a", step).node("b", step).node("w", step).chain("a", "b", "w")


async def _base_admission(
    adapter: RabbitMQAdapter, ctx: PostgresContext, node: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the base handler reads for a job of ``node`` (steps 2 and 3), by itself."""
    blueprint = adapter.runtime.blueprints["adm"]
    state = await ctx.get_many(adapter.first_read_keys(node))
    generation = int(state.get(K.resolved(node), 0)) + 1
    guess = adapter.likely_input_keys(analyse(blueprint), node, generation)
    found = await ctx.get_many([K.activation(node, generation), K.waiting(node), *guess])
    return state, found


async def _admit(adapter: RabbitMQAdapter, run: str, node: str, holder: str) -> Admission:
    ctx = adapter.create_context(run)
    payload = JobPayload(run_id=run, blueprint_id="adm", node_id=node)
    return await adapter.admit(ctx, payload, adapter.runtime.blueprints["adm"], holder)


async def test_admission_reads_what_the_base_reads_and_leases_when_it_would(
    namespace: Namespace,
) -> None:
    adapter = namespace.adapter(RuntimeOptions.from_flows(_flow()), lease_seconds=0.5)
    run = await adapter.start_run("adm")
    ctx = adapter.create_context(run)

    async def check(node: str, leased: bool | None, holder: str = "h1") -> Admission:
        got = await _admit(adapter, run, node, holder)
        state, found = await _base_admission(adapter, ctx, node)
        assert got.state == state
        assert got.found == found
        assert got.leased is leased, (node, got)
        return got

    # a is pending: its lease is taken, once (the same holder may take it again).
    first = await check("a", True)
    assert K.activation("a", 1) in (first.found or {})
    lease = K.lease(adapter.key_prefix, run, "a", 1)
    assert await adapter.coordination_store.get(lease) == "h1"
    await check("a", False, holder="h2")
    await check("a", True, holder="h1")
    # Expired, it is anyone's; the heartbeat sees the lease the admission took.
    assert await adapter.coordination_store.extend_ttl(lease, 0.2)
    await asyncio.sleep(0.3)
    await check("a", True, holder="h3")
    assert await adapter.coordination_store.get(lease) == "h3"
    # b has no record yet: a duplicate, no lease.
    await check("b", None)
    # a resolved and activated b: b's read carries a's output (its likely input).
    await ctx.patch(
        [
            PatchOperation.set(K.resolved("a"), 1),
            PatchOperation.set(K.output("a"), {"x": 1}),
            PatchOperation.set(K.activation("b", 1), {"skip": False, "inputs": {}}),
        ]
    )
    admitted = await check("a", None)  # resolved: nothing pending for a
    admitted = await check("b", True)
    assert (admitted.found or {})[K.output("a")] == {"x": 1}
    # A second activation of b (a loop would write it): read from n + 1 = 2.
    await ctx.patch(
        [
            PatchOperation.set(K.resolved("b"), 1),
            PatchOperation.set(K.activation("b", 2), {"skip": True}),
        ]
    )
    await check("b", True)
    assert await adapter.coordination_store.get(K.lease(adapter.key_prefix, run, "b", 2)) == "h1"
    # A paused node, a final run, another version: no lease.
    await ctx.patch(
        [
            PatchOperation.set(K.activation("w", 1), {"skip": False, "inputs": {}}),
            PatchOperation.set(K.waiting("w"), 1),
        ]
    )
    await check("w", None)
    await ctx.patch([PatchOperation.delete(K.waiting("w"))])
    await ctx.patch([PatchOperation.set(K.STATUS, {"status": "cancelled", "errors": []})])
    await check("w", None)
    await ctx.patch([PatchOperation.set(K.STATUS, {"status": "running", "errors": []})])
    await ctx.patch([PatchOperation.set(K.META, {"blueprintId": "adm", "version": "other"})])
    await check("w", None)
    version = adapter.runtime.blueprints["adm"].version
    await ctx.patch([PatchOperation.set(K.META, {"version": version, "blueprintId": "adm"})])
    await check("w", True)  # the same meta, keys in another order
    # No such run: nothing read, the handler dead-letters.
    assert await _admit(adapter, "no-such-run", "a", "h1") == Admission({})


# ---------------------------------------------------------------------- cost


RUNS = 8


def _chain(length: int) -> Flow:
    async def step(ctx: NodeContext) -> Any:
        return (ctx.input or 0) + 1

    flow = Flow(f"chain{length}")
    names = [f"n{i}" for i in range(length)]
    for name in names:
        flow.node(name, step)
    return flow.chain(*names)


async def _worker_statements(namespace: Namespace, flow: Flow) -> Counter[str]:
    """Statements one worker sends to PostgreSQL while ``RUNS`` runs of ``flow`` run at
    once, by the store's name for them, as the server received them (a query logger on
    every pooled connection)."""
    sent: list[str] = []

    async def init(connection: Any) -> None:
        connection.add_query_logger(lambda record: sent.append(record.query))

    options = RuntimeOptions.from_flows(flow)
    worker = namespace.adapter(options, postgres_options={"max_size": 4, "init": init})
    client = namespace.adapter(options)
    await worker.connect()
    sent.clear()  # the migration's statements
    task = asyncio.ensure_future(worker.worker())
    try:
        runs = [await client.start_run(flow.id) for _ in range(RUNS)]
        for run in runs:
            result = await client.wait_for_result(run, 60)
            assert result.status == "completed", result.errors
    finally:
        await worker.stop()
        await task
    names = {text: name for name, text in vars(worker.store.sql).items() if isinstance(text, str)}
    kinds = Counter(names.get(text, text) for text in sent)
    kinds.pop("lease_purge", None)  # every 10 s, whatever the jobs
    assert sum(kinds.values()) == sum(
        n for k, n in worker.store.round_trips.items() if k != "purge"
    ), "the store's count of its statements is off"
    return kinds


async def test_a_non_join_node_job_is_two_statements(namespace: Namespace) -> None:
    """The marginal cost of a chain job ((chain of 8 - chain of 4) / (runs x 4), so start
    and finalization drop out): one admission (reads and lease) and one commit."""
    short = await _worker_statements(namespace, _chain(4))
    long = await _worker_statements(namespace, _chain(8))
    extra = long - short
    assert extra == Counter({"admit": RUNS * 4, "patch_guarded_row": RUNS * 4}), (short, long)
    assert short["admit"] == RUNS * 4  # every job admitted in one statement


async def test_statements_share_a_few_lanes_and_a_lost_lane_is_replaced(
    backends: Backends, lease_table: str
) -> None:
    """More statements at once than lanes: the lanes serve some and the pool the rest,
    never more lanes than asked; a lane whose server connection died is dropped and
    the next statement runs on a new one."""
    store = PostgresRunStore(dsn=backends.postgres_dsn, table=lease_table, max_size=5, lanes=2)
    try:
        ctx = PostgresContext(store, f"lanes-{uuid.uuid4().hex}")
        await ctx.patch([PatchOperation("set", "k", 1)])
        values = await asyncio.gather(*(ctx.get("k") for _ in range(12)))
        assert values == [1] * 12
        assert len(store._lanes) == 2
        pids = {lane.get_server_pid() for lane in store._lanes}
        pool = await store.pool()
        async with pool.acquire() as other:
            killed = await other.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(p) "
                "FROM unnest($1::int[]) AS p) AS t",
                list(pids),
            )
        assert killed == 2
        assert await ctx.get("k") == 1  # on a new lane (a read rides out a lost one)
        await ctx.patch([PatchOperation("set", "k", 2)])
        assert await ctx.get("k") == 2
        assert len(store._lanes) <= 2
        assert not pids & {lane.get_server_pid() for lane in store._lanes}
    finally:
        await store.aclose()


@pytest.mark.parametrize("lanes", [None, 0], ids=["lanes", "client"])
async def test_marks_are_written_behind_in_one_round_trip(
    backends: Backends, lanes: int | None
) -> None:
    """Follow-up marks reach Redis with their TTL, in one batch, without overwriting a
    mark already there; on the store's lanes and through its client alike."""
    import redis.asyncio as redis_asyncio

    from flowcraft.distributed import RedisCoordinationStore
    from flowcraft_rabbitmq._coordination import MarksBehind

    prefix = f"fc-marks-{uuid.uuid4().hex[:8]}:"
    store = RedisCoordinationStore(url=backends.redis_url, key_prefix=prefix, lanes=lanes)
    raw = redis_asyncio.Redis.from_url(backends.redis_url, decode_responses=True)
    try:
        await raw.set(prefix + "m0", "kept")
        marks = MarksBehind(store, interval=0.01)
        for i in range(5):
            marks.add(f"m{i}", 30)
        await marks.flush()
        assert (marks.written, marks.batches) == (5, 1)
        assert await raw.mget([prefix + f"m{i}" for i in range(5)]) == ["kept"] + ["1"] * 4
        assert 0 < await raw.pttl(prefix + "m4") <= 30_000
        await store.set_if_not_exist("after", "v", 30)  # the lane still answers in order
        assert await store.get("after") == "v"
    finally:
        keys = [key async for key in raw.scan_iter(match=prefix + "*")]
        if keys:
            await raw.delete(*keys)
        await raw.aclose()
        await store.aclose()
