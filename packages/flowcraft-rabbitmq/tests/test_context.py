"""PostgresContext and the run store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from flowcraft import PatchOperation, SerializationError
from flowcraft.context import AsyncContext
from flowcraft.testing import ContextStoreTests
from flowcraft_rabbitmq import SCHEMA_VERSION, PostgresContext, PostgresRunStore

from .conftest import Backends

# Keys that break stores building SQL or JSON paths from text.
HOSTILE_KEYS = [
    "quotes ' \" `",
    "''; DROP TABLE flowcraft_runs; --",
    "braces {a} {{b}} ${c} %(d)s",
    "commas a,b,,c",
    "{a,b}",
    "dots.in.the.key",
    "back\\slash \\n \\\\",
    "unicode é 中文 🚀 \u200b",
    "$1 $2 ? ?| ?& -> #> #-",
    "brackets [0] ['x']",
    'json {"k": [1, 2]}',
    "new\nline\ttab",
    "",
    "k" * 1024,
]


class QueryLog:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, record: Any) -> None:
        self.queries.append(record.query)


@pytest.fixture
async def logged() -> QueryLog:
    return QueryLog()


@pytest.fixture
async def store(backends: Backends, logged: QueryLog) -> AsyncIterator[PostgresRunStore]:
    """A store on its own table, over a pool whose connections log every statement."""

    async def init(conn: Any) -> None:
        conn.add_query_logger(logged)

    async def no_reset(conn: Any) -> None:
        pass

    pool = await asyncpg.create_pool(
        backends.postgres_dsn, min_size=1, max_size=8, init=init, reset=no_reset
    )
    table = f"fc_ctx_{uuid.uuid4().hex[:12]}"
    store = PostgresRunStore(pool=pool, table=table)
    try:
        yield store
    finally:
        await pool.execute(
            f"DROP TABLE IF EXISTS {store.names.runs}, {store.names.versions}, {store.names.leases}"
        )
        await store.aclose()
        await pool.close()


async def test_hostile_keys_round_trip(store: PostgresRunStore, logged: QueryLog) -> None:
    ctx = PostgresContext(store, "run-hostile")
    values = {
        key: {"value": f"for {key}", "n": i, "nested": {key: [key]}}
        for i, key in enumerate(HOSTILE_KEYS)
    }
    await ctx.patch([PatchOperation.set(k, v) for k, v in values.items()])
    for key, value in values.items():
        assert await ctx.get(key) == value, key
        assert await ctx.has(key), key
    assert await ctx.get_many(HOSTILE_KEYS) == values
    assert await ctx.to_dict() == values
    await ctx.patch([PatchOperation.delete(k) for k in HOSTILE_KEYS[::2]])
    assert await ctx.to_dict() == {k: values[k] for k in HOSTILE_KEYS[1::2]}
    statements = set(logged.queries)
    for key in HOSTILE_KEYS:
        if len(key) > 3:
            assert not any(key in q for q in statements), f"key {key!r} in SQL text"


async def test_patch_is_one_statement_with_constant_text(
    store: PostgresRunStore, logged: QueryLog
) -> None:
    ctx = PostgresContext(store, "run-one")
    await ctx.get("warm-up")  # the pool and the schema exist
    texts = set()
    for n in (1, 3, 40):
        logged.queries.clear()
        ops = [PatchOperation.set(f"key {i} of {n}", i) for i in range(n)]
        ops.append(PatchOperation.delete(f"gone {n}"))
        await ctx.patch(ops)
        assert len(logged.queries) == 1, logged.queries
        texts.add(logged.queries[0])
    assert len(texts) == 1, "the patch statement changes with its operations"
    (text,) = texts
    assert "||" in text
    assert "- $2::text[]" in text


async def test_patch_applies_operations_in_order(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "run-order")
    await ctx.patch([PatchOperation.set("a", 1), PatchOperation.set("b", 1)])
    await ctx.patch(
        [
            PatchOperation.delete("a"),
            PatchOperation.set("a", 2),
            PatchOperation.set("b", 2),
            PatchOperation.delete("b"),
            PatchOperation.set("c", None),
        ]
    )
    assert await ctx.to_dict() == {"a": 2, "c": None}
    assert await ctx.has("c")
    assert await ctx.get("c") is None
    assert not await ctx.has("b")
    assert await ctx.get_many(["a", "b", "c", "zzz"]) == {"a": 2, "c": None}
    assert await ctx.get_many([]) == {}


async def test_a_refused_patch_changes_nothing(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "run-atomic")
    await ctx.patch([PatchOperation.set("kept", 1)])
    with pytest.raises(SerializationError, match=r"context key 'bad \\x00'.*NUL"):
        await ctx.patch([PatchOperation.set("fine", 2), PatchOperation.set("bad \x00", 1)])
    with pytest.raises(SerializationError, match=r"context key 'bad'.*surrogate"):
        await ctx.patch([PatchOperation.set("fine", 2), PatchOperation.set("bad", "x\udc00")])
    assert await ctx.to_dict() == {"kept": 1}


async def test_concurrent_patches_lose_no_update(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "run-race")
    await ctx.patch([PatchOperation.set("start", True)])
    await asyncio.gather(*(ctx.patch([PatchOperation.set(f"k{i}", i)]) for i in range(60)))
    state = await ctx.to_dict()
    assert {k: v for k, v in state.items() if k != "start"} == {f"k{i}": i for i in range(60)}


async def test_missing_run_reads_as_empty(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "never-started")
    assert await ctx.get("x") is None
    assert not await ctx.has("x")
    assert await ctx.get_many(["x"]) == {}
    assert await ctx.to_dict() == {}


async def test_runs_do_not_share_state(store: PostgresRunStore) -> None:
    a, b = PostgresContext(store, "run-a"), PostgresContext(store, "run-b")
    await a.set("k", "a")
    await b.set("k", "b")
    assert (await a.get("k"), await b.get("k")) == ("a", "b")


async def test_schema_is_versioned(store: PostgresRunStore) -> None:
    await store.pool()
    assert await store.migrate() == SCHEMA_VERSION  # again: nothing to do
    pool = await store.pool()
    versions = await pool.fetch(f"SELECT version FROM {store.names.versions}")
    assert [r[0] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    await pool.execute(f"INSERT INTO {store.names.versions} (version) VALUES (99)")
    with pytest.raises(RuntimeError, match="schema version 99"):
        await store.migrate()


async def test_workers_starting_together_migrate_once(backends: Backends) -> None:
    table = f"fc_mig_{uuid.uuid4().hex[:12]}"
    stores = [
        PostgresRunStore(dsn=backends.postgres_dsn, table=table, min_size=1, max_size=1)
        for _ in range(6)
    ]
    try:
        await asyncio.gather(*(s.pool() for s in stores))
        pool = await stores[0].pool()
        assert await pool.fetchval(f"SELECT count(*) FROM {stores[0].names.versions}") == (
            SCHEMA_VERSION
        )
    finally:
        pool = await stores[0].pool()
        await pool.execute(
            f"DROP TABLE IF EXISTS {stores[0].names.runs}, {stores[0].names.versions}, "
            f"{stores[0].names.leases}"
        )
        for s in stores:
            await s.aclose()


async def test_published_result_is_written_once(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "run-result")
    await ctx.set("_flowcraft.status", {"status": "completed", "errors": []})
    first = {"runId": "run-result", "status": "completed", "context": {"n": 1}, "errors": []}
    await store.publish("run-result", first)
    await store.publish("run-result", {**first, "context": {"n": 2}})
    published, status = await store.result("run-result")
    assert published == first
    assert status == {"status": "completed", "errors": []}
    assert await store.result("nope") == (None, None)


async def test_purge_finished_runs(store: PostgresRunStore) -> None:
    await PostgresContext(store, "done").set("k", 1)
    await PostgresContext(store, "running").set("k", 1)
    await store.publish("done", {"runId": "done", "status": "completed", "context": {}})
    assert await store.purge_finished(3600) == 0
    assert await store.purge_finished(0) == 1
    assert await PostgresContext(store, "done").to_dict() == {}
    assert await PostgresContext(store, "running").to_dict() == {"k": 1}


class TestPostgresContextKit(ContextStoreTests):
    """The context kit (guarded patch included); racers share the store's pool."""

    @pytest.fixture
    async def context(self, store: PostgresRunStore) -> AsyncContext:
        return PostgresContext(store, f"run-{uuid.uuid4().hex[:8]}")

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        assert isinstance(context, PostgresContext)
        return PostgresContext(context.store, context.run_id)


async def test_a_patch_updates_the_row_in_place(store: PostgresRunStore) -> None:
    """Schema version 4: no index covers ``updated_at`` (which every patch bumps), so
    PostgreSQL updates a run's row on its page without new index entries (a HOT
    update), and a state of a few KB stays uncompressed in the row."""
    ctx = PostgresContext(store, "hot")
    await ctx.set("start", 1)
    pool = await store.pool()
    async with pool.acquire() as conn, conn.transaction():
        for i in range(5):
            await conn.execute(store.sql.patch, "hot", [], json.dumps({"k": json.dumps(i)}))
        hot = await conn.fetchval(
            "SELECT pg_stat_get_xact_tuples_hot_updated($1::regclass)", store.names.runs
        )
    assert hot == 5
    await ctx.set("big", "x" * 4000)  # compressible to a few bytes
    size = await pool.fetchval(
        f"SELECT pg_column_size(state) FROM {store.names.runs} WHERE run_id = 'hot'"
    )
    assert size > 4000  # stored as is
