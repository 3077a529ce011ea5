"""Run history on a real fleet (BullMQ on Redis, SQLite history shared by the worker
processes): a worker SIGKILLed mid-run loses the events still queued in its memory;
its spool file keeps them (another recorder stores them), its redelivered jobs emit
theirs again, and every run's history ends complete and duplicate-free."""

from __future__ import annotations

import asyncio
import signal
import socket
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from flowcraft.history import History, SqliteHistoryStore
from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    NODES,
    WorkerProcesses,
    blueprints,
    check_effects,
    check_results,
    read_effects,
)

from .history_fleet import RecordingAdapter, Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FLEET = Path(__file__).with_name("history_fleet.py")
RUNS = 30
KILL_AFTER = 60


def ran_by(fleet: Settings) -> Counter[int]:
    """Node executions per worker process so far."""
    if not Path(fleet.effects_path).exists():
        return Counter()
    return Counter(e["pid"] for e in read_effects(fleet.effects_path) if e["node"] in NODES)


@pytest.fixture
async def fleet(redis_service: RunningService, tmp_path: Path) -> AsyncIterator[Settings]:
    prefix = f"fc-history-{uuid.uuid4().hex[:10]}:"
    yield Settings(
        effects_path=str(tmp_path / "effects.jsonl"),
        redis_url=redis_service.url,
        key_prefix=prefix,
        history_path=str(tmp_path / "history.db"),
        spool_path=str(tmp_path / "spool"),
    )
    client = redis_asyncio.Redis.from_url(redis_service.url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


async def test_history_is_complete_and_duplicate_free_after_a_sigkill(fleet: Settings) -> None:
    client: RecordingAdapter = fleet.adapter(blueprints())  # records the runs' starts
    workers = WorkerProcesses(FLEET, fleet, count=2)
    try:
        async with asyncio.timeout(30):  # both running before the runs start
            while not workers._all_ready():  # noqa: ASYNC110 (other processes write the file)
                await asyncio.sleep(0.05)
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        # Killed mid-run, once it has run KILL_AFTER nodes: long before its first
        # write to the store (every 3 s), so all it recorded is in its memory and spool.
        # The victim is whichever worker gets there first: one that started late may
        # never get there before the other has finished every run (seen in CI).
        async with asyncio.timeout(60):
            while not (ahead := [p for p, n in ran_by(fleet).items() if n >= KILL_AFTER]):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        index = next(i for i, p in enumerate(workers.procs) if p.pid == ahead[0])
        victim = workers.procs[index]
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait)
        workers.procs[index] = workers.spawn()
        assert await client.get_final_result(runs[-1]) is None, "the runs ended too soon"
        for run_id in runs:
            await client.wait_for_result(run_id, 120)
        await check_results(client, runs)
    finally:
        await workers.stop()
        await client.aclose()  # its recorder recovers what no other recorder has yet
    check_effects(fleet.effects_path, runs)

    # Executions the kill made the fleet redo (same activation, run twice).
    effects = [e for e in read_effects(fleet.effects_path) if e["node"] in NODES]
    executions = Counter((e["run"], e["node"]) for e in effects)
    redone = [k for k, n in executions.items() if n > 1]

    async with SqliteHistoryStore(fleet.history_path) as store:
        history = History(store)
        workers_seen: set[str] = set()
        for run_id in runs:
            events = await history.events(run_id)
            workers_seen |= {e.worker for e in events}
            kinds = Counter(e.kind for e in events)
            assert kinds["workflow:start"] == 1, run_id
            assert kinds["workflow:finish"] == 1, (run_id, kinds)
            finished = Counter(e.node_id for e in events if e.kind == "node:finish")
            # Complete: every node's resolution, and each exactly once.
            assert finished == dict.fromkeys(NODES, 1), (run_id, finished)
            started = Counter(e.node_id for e in events if e.kind == "node:start")
            assert set(started) == set(NODES), (run_id, started)
            assert set(started.values()) == {1}, (run_id, started)  # a redo is the same start
            assert [e.kind for e in events if e.kind.startswith("workflow:")] == [
                "workflow:start",
                "workflow:finish",
            ]
            steps = await history.steps(run_id)
            assert sorted(s.node_id for s in steps) == sorted(NODES)
            assert (await history.context_at(run_id))["_outputs.end"] == 136
        runs_summary = await history.recent_runs(limit=RUNS + 10)
    assert Counter(r.status for r in runs_summary) == {"completed": RUNS}
    # What the killed worker did is in the history: it never wrote to the store, so
    # its events came from its spool file, recovered by a recorder that outlived it.
    from_killed = sum(1 for e in effects if e["pid"] == victim.pid)
    assert from_killed >= KILL_AFTER
    assert f"{socket.gethostname()}:{victim.pid}" in workers_seen
    print(
        f"\nhistory crash test: {from_killed} node executions by the killed worker, "
        f"{len(redone)} activations executed twice; every run's history complete "
        "and duplicate-free"
    )
