"""Exact values in PostgreSQL (issue 22, item 2): jsonb normalised numbers (``1e16``
came back as an int, ``1e308`` as ``10**308``); the store now keeps each value's
JSON text. Also the upgrade of a version-1 table, and the result column."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from flowcraft import Flow, NodeContext, PatchOperation, RuntimeOptions, SerializationError
from flowcraft.testing.fidelity import EXACT_VALUES, nested, same_value
from flowcraft_rabbitmq import SCHEMA_VERSION, PostgresContext, PostgresRunStore
from flowcraft_rabbitmq._store import _MIGRATIONS, _Sql

from .conftest import Backends, Namespace

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def store(backends: Backends) -> AsyncIterator[PostgresRunStore]:
    table = f"fc_fid_{uuid.uuid4().hex[:12]}"
    store = PostgresRunStore(dsn=backends.postgres_dsn, table=table, min_size=1, max_size=4)
    try:
        yield store
    finally:
        pool = await store.pool()
        await pool.execute(
            f"DROP TABLE IF EXISTS {store.names.runs}, {store.names.versions}, {store.names.leases}"
        )
        await store.aclose()


async def test_every_read_returns_the_exact_value(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "exact")
    await ctx.patch([PatchOperation("set", k, v) for k, v in EXACT_VALUES.items()])
    assert same_value(await ctx.get("float 1e16"), 1e16)
    assert same_value(await ctx.get("float 1e308"), 1e308)
    many = await ctx.get_many([*EXACT_VALUES, "absent"])
    state = await ctx.to_dict()
    for key, value in EXACT_VALUES.items():
        assert same_value(await ctx.get(key), value), key
        assert same_value(many[key], value), key
        assert same_value(state[key], value), key
    assert "absent" not in many


async def test_guard_compares_exact_texts(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "guards")
    await ctx.patch([PatchOperation("set", "_flowcraft.n.x", 2**64 + 1)])
    assert not await ctx.patch([PatchOperation("set", "a", 1)], guard={"_flowcraft.n.x": 2**64})
    assert await ctx.patch([PatchOperation("set", "a", 1)], guard={"_flowcraft.n.x": 2**64 + 1})
    await ctx.patch([PatchOperation("set", "_flowcraft.s", "1e16")])
    assert not await ctx.patch([PatchOperation("set", "b", 1)], guard={"_flowcraft.s": 1})
    assert await ctx.patch([PatchOperation("set", "b", 1)], guard={"_flowcraft.s": "1e16"})
    assert await ctx.to_dict() == {
        "_flowcraft.n.x": 2**64 + 1,
        "a": 1,
        "_flowcraft.s": "1e16",
        "b": 1,
    }


async def test_the_result_is_kept_exactly(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "result")
    await ctx.set("_flowcraft.status", {"status": "completed", "errors": []})
    result = {"runId": "result", "status": "completed", "context": dict(EXACT_VALUES)}
    await store.publish("result", result)
    published, status = await store.result("result")
    assert published is not None
    assert same_value(published["context"], dict(EXACT_VALUES))
    assert status == {"status": "completed", "errors": []}


async def test_unstorable_values_are_refused_before_sending(store: PostgresRunStore) -> None:
    ctx = PostgresContext(store, "refused")
    before = store.round_trips["patch"]
    for key, value, words in (
        ("surrogate", "x\udc00", "surrogate"),
        ("deep", nested(5000), "deeper than"),
        ("nan", [float("nan")], "NaN"),
        ("nul key \x00", 1, "NUL"),
    ):
        with pytest.raises(SerializationError, match=words) as caught:
            await ctx.patch([PatchOperation("set", key, value)])
        assert repr(key) in str(caught.value)
    assert store.round_trips["patch"] == before, "a refused value was sent"


async def test_version_1_table_is_upgraded(backends: Backends) -> None:
    """A table written by schema version 1 (values as jsonb) reads the same after the
    upgrade to version 2 (and on to the latest), and a running run's status is still
    found by the reconciler."""
    table = f"fc_up_{uuid.uuid4().hex[:12]}"
    store = PostgresRunStore(dsn=backends.postgres_dsn, table=table, create_schema=False)
    sql = _Sql(store.names)
    conn = await asyncpg.connect(backends.postgres_dsn)
    try:
        await conn.execute(sql.versions_table)
        for statement in sql.migrations[0]:
            await conn.execute(statement)
        await conn.execute(sql.record_version, 1)
        old_state = {
            "n": 3,
            "text": "a 'quoted' \"text\"",
            "_flowcraft.status": {"status": "running", "errors": []},
            "nested": {"a": [1, 2.5, None, True]},
        }
        await conn.execute(
            f"INSERT INTO {store.names.runs} (run_id, state, updated_at) "
            "VALUES ('old', $1::text::jsonb, now() - interval '1 hour')",
            json.dumps(old_state),
        )
        await conn.execute(
            f"INSERT INTO {store.names.runs} (run_id, result) VALUES ('done', $1::text::jsonb)",
            json.dumps({"runId": "done", "status": "completed", "context": {"x": 1}}),
        )
        assert len(_MIGRATIONS) == SCHEMA_VERSION == 4
        await store.pool()  # create_schema=False: the pool only
        assert await store.migrate() == SCHEMA_VERSION
        assert await store.to_dict("old") == old_state
        assert await store.get("old", "nested") == {"a": [1, 2.5, None, True]}
        published, _ = await store.result("done")
        assert published == {"runId": "done", "status": "completed", "context": {"x": 1}}
        assert await store.claim_stalled(60, 10) == ["old"]
        await store.patch("old", [PatchOperation("set", "f", 1e16)])
        assert same_value(await store.get("old", "f"), 1e16)
    finally:
        names = store.names
        await conn.execute(f"DROP TABLE IF EXISTS {names.runs}, {names.versions}, {names.leases}")
        await conn.close()
        await store.aclose()


async def test_floats_round_trip_through_a_run(namespace: Namespace) -> None:
    """The issue's run: a node writes 1e16 and 1e308; the next node, ``_outputs`` and
    the final result read the same floats (they read ints)."""
    seen: list[Any] = []

    async def write(ctx: NodeContext) -> list[float]:
        await ctx.set("f", [1e16, 1e308, 0.1, -0.0])
        return [1e16, 1e308]

    async def read(ctx: NodeContext) -> Any:
        seen.append((ctx.input, await ctx.get("f")))
        return ctx.input

    flow = Flow("floats").node("w", write).node("r", read).chain("w", "r")
    options = RuntimeOptions.from_flows(flow)
    worker = namespace.adapter(options)
    client = namespace.adapter(options)
    task = asyncio.ensure_future(worker.worker())
    try:
        run = await client.start_run("floats")
        result = await client.wait_for_result(run, 30)
    finally:
        await worker.stop()
        await task
    assert result.status == "completed", result.errors
    assert same_value(seen, [([1e16, 1e308], [1e16, 1e308, 0.1, -0.0])])
    assert same_value(result.context["f"], [1e16, 1e308, 0.1, -0.0])
    assert same_value(result.context["_outputs.r"], [1e16, 1e308])
