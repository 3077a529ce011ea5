"""History retention on a real PostgreSQL: a purge in batches (each chunk its own
transaction, writers going on meanwhile), unfinished runs kept unless asked, ids
as data; the size cap; the CLI's purge on a postgresql:// store."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from click.testing import CliRunner

from flowcraft.cli import main
from flowcraft.history import (
    History,
    HistoryEvent,
    PostgresHistoryStore,
    PurgeResult,
    truncated,
)
from flowcraft_backends import RunningService

DAY = 86400.0
NOW = 2_000 * DAY


def events_of(run_id: str, at: float, status: str | None, nodes: int) -> list[HistoryEvent]:
    """Start, ``nodes`` context writes, then the end with ``status`` (None: running)."""
    made = [HistoryEvent(run_id, "workflow:start", "workflow:start", data={"context": {}}, at=at)]
    made += [
        HistoryEvent(run_id, "context:change", f"c{i}", "n", 1, None, {"key": f"k{i}"}, at + 1)
        for i in range(nodes)
    ]
    if status is not None:
        finish = {"status": status}
        made.append(HistoryEvent(run_id, "workflow:finish", "f", data=finish, at=at + 2))
    return made


@pytest.fixture
async def store(postgres_service: RunningService) -> AsyncIterator[PostgresHistoryStore]:
    made = PostgresHistoryStore(
        postgres_service.url,
        table_prefix=f"fc_retention_{uuid.uuid4().hex[:8]}",
        max_value_bytes=2000,
    )
    yield made
    await made.drop()
    await made.aclose()


async def test_purge_in_batches_while_writers_write(
    store: PostgresHistoryStore, postgres_service: RunningService
) -> None:
    hostile = "x'); DELETE FROM pg_class; --\x00"
    await store.write(events_of(hostile, NOW - 10 * DAY, "completed", 3))
    for i in range(40):
        await store.write(events_of(f"old-{i}", NOW - 10 * DAY, "completed", 30))
    await store.write(events_of("old-running", NOW - 10 * DAY, None, 30))
    await store.write(events_of("old-failed", NOW - 10 * DAY, "failed", 0))
    total = 5 + 40 * 32 + 2

    dry = await store.purge(older_than=DAY, dry_run=True, now=NOW)
    assert dry == PurgeResult(42, total, kept_unfinished=1, dry_run=True)
    # Another transaction holds the row of one run: the purge deletes (and commits)
    # its batch's events chunk by chunk, then waits to delete the runs' rows. Writers
    # are not held up meanwhile.
    tables = store._sql.tables
    conn: Any = await asyncpg.connect(postgres_service.url)
    try:
        hold = conn.transaction()
        await hold.start()
        await conn.execute(f"SELECT 1 FROM {tables['runs']} WHERE run_id = 'old-7' FOR UPDATE")
        purge = asyncio.ensure_future(store.purge(older_than=DAY, batch_size=16, now=NOW))
        events_of_held = f"SELECT count(*) FROM {tables['events']} WHERE run_id = 'old-7'"
        other = await asyncpg.connect(postgres_service.url)
        try:
            async with asyncio.timeout(30):
                while True:
                    if await other.fetchval(events_of_held) == 0:
                        break
                    await asyncio.sleep(0.02)
        finally:
            await other.close()
        assert not purge.done()  # its events are gone, committed; its row waits
        assert await store.write(events_of("new-0", NOW, "completed", 0)) == 2
        await hold.rollback()
        result = await purge
    finally:
        await conn.close()
    assert result == PurgeResult(42, total, kept_unfinished=1)
    assert {r.run_id for r in await store.runs(limit=1000)} == {"old-running", "new-0"}
    assert await store.events(hostile) == []
    # asked explicitly, the running run goes too; given ids are data
    forced = await store.purge(run_ids=["old-running", hostile], include_unfinished=True)
    assert forced == PurgeResult(1, 31, kept_unfinished=0)


async def test_the_cap_on_postgres(store: PostgresHistoryStore) -> None:
    big = {"rows": [{"id": i, "name": "é" * 20} for i in range(100)]}
    data = {"output": big, "action": "ok"}
    await store.write([HistoryEvent("cap", "node:finish", "k", "n", 1, None, data, 1.0)])
    (event,) = await store.events("cap")
    marker = truncated(event.data["output"])
    assert marker is not None
    assert marker.matches(big)
    assert event.data["action"] == "ok"
    assert marker.bytes > 2000  # its JSON as stored: non-ASCII escaped
    steps = await History(store).steps("cap")
    assert steps[0].truncated == ["output"]


@pytest.fixture
async def database(postgres_service: RunningService) -> AsyncIterator[str]:
    """A database of this test's own: the CLI uses the default table names."""
    name = f"fc_cli_{uuid.uuid4().hex[:8]}"
    conn: Any = await asyncpg.connect(postgres_service.url)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        yield urlunsplit(urlsplit(postgres_service.url)._replace(path=f"/{name}"))
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


def test_cli_purges_a_postgres_store(database: str) -> None:
    async def fill() -> None:
        async with PostgresHistoryStore(database) as store:
            await store.write(events_of("old", 1.0, "completed", 2))
            await store.write(events_of("old-running", 1.0, None, 2))
            await store.write(events_of("young", 4e9, "completed", 2))

    asyncio.run(fill())
    runner = CliRunner()
    purge = ["history", "purge", "--store", database, "--older-than", "30d", "--yes", "--json"]
    result = runner.invoke(main, purge)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "runs": 1,
        "events": 4,
        "keptUnfinished": 1,
        "dryRun": False,
    }
    listed = runner.invoke(main, ["history", "--store", database, "--json"])
    assert {r["runId"] for r in json.loads(listed.stdout)["runs"]} == {"young", "old-running"}
