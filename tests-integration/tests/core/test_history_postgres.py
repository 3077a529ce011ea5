"""PostgresHistoryStore on a real PostgreSQL: a run recorded and read back, the same
events twice stored once, hostile ids as data, another schema version refused."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from flowcraft import CollectingEventBus, Flow, FlowRuntime, NodeContext
from flowcraft.history import (
    History,
    HistoryError,
    HistoryEvent,
    HistoryRecorder,
    PostgresHistoryStore,
    open_store,
    recent_runs,
)
from flowcraft_backends import RunningService


async def _total(ctx: NodeContext) -> int:
    await ctx.set("total", sum(ctx.input))
    return sum(ctx.input)


def flow() -> Flow:
    return (
        Flow("sum").node("load", lambda ctx: [1, 2, 3]).node("total", _total).chain("load", "total")
    )


@pytest.fixture
async def store(postgres_service: RunningService) -> AsyncIterator[PostgresHistoryStore]:
    made = PostgresHistoryStore(
        postgres_service.url, table_prefix=f"fc_history_{uuid.uuid4().hex[:8]}"
    )
    yield made
    await made.drop()
    await made.aclose()


async def test_a_run_recorded_in_postgres_reads_back(store: PostgresHistoryStore) -> None:
    collecting = CollectingEventBus()
    async with HistoryRecorder(store, inner=collecting) as recorder:
        result = await FlowRuntime(event_bus=recorder).run(flow(), {"k": "v"}, run_id="pg-1")
    history = History(store)
    steps = await history.steps("pg-1")
    assert [(s.node_id, s.output) for s in steps] == [("load", [1, 2, 3]), ("total", 6)]
    assert await history.context_at("pg-1", 0) == {"k": "v"}
    assert await history.context_at("pg-1") == result.context
    stored = await store.events("pg-1")
    # The same events again (a redelivery's), in one batch: none inserted.
    again: list[HistoryEvent] = [
        HistoryEvent(e.run_id, e.kind, e.key, e.node_id, e.activation, e.attempt, e.data, 1.0)
        for e in stored
    ]
    assert await store.write(again) == 0
    assert await store.events("pg-1") == stored
    (summary,) = await recent_runs(store)
    assert (summary.run_id, summary.blueprint_id, summary.status) == ("pg-1", "sum", "completed")


async def test_hostile_text_is_data(store: PostgresHistoryStore) -> None:
    run_id = "r'); DROP TABLE x; --\x00\ud800"
    event = HistoryEvent(
        run_id, "context:change", "k\x00'\ud800", "n\"'", 1, None, {"key": "\x00", "v": {1}}, 2.0
    )
    assert await store.write([event]) == 1
    (found,) = await store.events(run_id)
    assert found.data == {"key": "\x00", "v": [1]}
    assert found.node_id == "n\"'"


async def test_another_schema_version_is_refused(
    postgres_service: RunningService, store: PostgresHistoryStore
) -> None:
    await store.write([HistoryEvent("r", "workflow:start", "workflow:start", at=1.0)])
    conn: Any = await asyncpg.connect(postgres_service.url)
    try:
        meta = store._sql.tables["meta"]
        await conn.execute(f"UPDATE {meta} SET value = '2' WHERE name = 'schema_version'")
    finally:
        await conn.close()
    other = PostgresHistoryStore(postgres_service.url, table_prefix=meta.removesuffix("_meta"))
    try:
        with pytest.raises(HistoryError, match="version 2"):
            await other.runs()
    finally:
        await other.aclose()
    assert "postgres" not in repr(other)  # the DSN (with its password) is never shown
    assert isinstance(open_store(postgres_service.url), PostgresHistoryStore)


def _event(run_id: str, kind: str, at: float, **data: object) -> HistoryEvent:
    return HistoryEvent(run_id, kind, f"{kind}@{at}", "n", 1, 1, dict(data), at)


async def test_a_run_s_status_follows_its_waits_and_its_end_stays(
    store: PostgresHistoryStore,
) -> None:
    """The runs table's upsert: a fleet's wait (node:awaiting) reads awaiting, a wake
    running; once ended, a later event (a duplicate job's) leaves the end; an end
    with an older clock than a wait still ends the run."""
    steps = [
        ("workflow:start", 1.0, {}, "running"),
        ("node:awaiting", 2.0, {}, "awaiting"),
        ("node:wake", 3.0, {}, "running"),
        ("workflow:finish", 4.0, {"status": "completed"}, "completed"),
        ("node:awaiting", 9.0, {}, "completed"),
    ]
    seen = []
    for kind, at, data, _ in steps:
        await store.write([_event("pg-s", kind, at, **data)])
        seen.append({r.run_id: r.status for r in await store.runs()}["pg-s"])
    assert seen == [step[3] for step in steps]
    await store.write([_event("pg-late", "node:awaiting", 50.0)])
    await store.write([_event("pg-late", "workflow:finish", 40.0, status="cancelled")])
    assert {r.run_id: r.status for r in await store.runs()}["pg-late"] == "cancelled"
