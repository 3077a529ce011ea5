"""Crash test on Google's emulators and Redis: two worker processes, one SIGKILLed again
and again while 200 diamond runs go through. Every run must complete exactly once, no
join may fire early, every publication of a run must be the same result, and nothing
may be left behind (subscription, dead letters, coordination counters). The time from
each kill to the next finished run is printed."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from redis import exceptions as redis_exceptions

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    NODES,
    WorkerProcesses,
    blueprints,
    check_effects,
    check_results,
    read_effects,
    restarter,
)
from flowcraft_gcp import GcpAdapter

from .gcp_fleet import Settings

pytestmark = pytest.mark.slow

RUNS = 200
FLEET = Path(__file__).with_name("gcp_fleet.py")
COUNTERS = ("join:", "end:", "latch:", "fired:")


@pytest.fixture
async def fleet(
    pubsub_service: RunningService,
    firestore_service: RunningService,
    redis_service: RunningService,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    """(The emulators keep everything in memory and lose it on a restart, so only Redis,
    which keeps an append-only file, is restarted mid-run below.)"""
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        pubsub_host=pubsub_service.url,
        firestore_host=firestore_service.url,
        redis_url=redis_service.url,
        project=f"fc-crash-{tag}",
        key_prefix=f"fc-crash:{tag}:",
        effects_path=str(tmp_path / "effects.jsonl"),
    )
    saved = {k: os.environ.get(k) for k in ("PUBSUB_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST")}
    yield settings
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    redis = redis_asyncio.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=settings.key_prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


class Progress:
    """Samples runs finished (published results) and node executions (the effects file),
    to time each kill's recovery."""

    def __init__(self, client: GcpAdapter, runs: list[str], effects_path: str) -> None:
        self.keys = [client.results.key(r) for r in runs]
        self.redis = client.redis
        self.effects_path = effects_path
        self.samples: list[tuple[float, int]] = []  # (time, node executions)
        self.kills: list[float] = []

    async def published(self) -> int:
        found = await self.redis.mget(self.keys)
        return sum(1 for f in found if f is not None)

    def executions(self) -> int:
        if not os.path.exists(self.effects_path):
            return 0
        return len(read_effects(self.effects_path))

    async def until_all(self, seconds: float) -> None:
        async with asyncio.timeout(seconds):
            while True:
                self.samples.append((time.monotonic(), self.executions()))
                try:
                    if await self.published() == len(self.keys):
                        return
                except redis_exceptions.ConnectionError:
                    pass  # Redis restarting: look again

                await asyncio.sleep(0.1)

    def recoveries(self) -> list[float]:
        """Seconds from each kill to the next node execution after it."""
        out = []
        for kill in self.kills:
            before = max((n for t, n in self.samples if t <= kill), default=0)
            later = [t for t, n in self.samples if t > kill and n > before]
            if later:
                out.append(later[0] - kill)
        return out


async def check_exactly_once(settings: Settings, client: GcpAdapter, runs: list[str]) -> None:
    await check_results(client, runs)
    for run in runs:
        state = await client.create_context(run).get_many(
            [f"_flowcraft.n.{n}" for n in NODES] + ["_flowcraft.status"]
        )
        assert state.pop("_flowcraft.status")["status"] == "completed"
        assert set(state.values()) == {1}, (run, state)  # each node resolved exactly once
        assert len(state) == len(NODES)
    check_effects(settings.effects_path, runs)


async def check_nothing_left(settings: Settings, client: GcpAdapter) -> None:
    await asyncio.sleep(1.0)  # let acks in flight land
    assert await client.queue.pull(100) == [], "jobs left on the subscription"
    assert await client.dead_letters() == []
    assert await client.find_stalled_runs(0, 1000) == [], "a finished run is still indexed"
    redis = redis_asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        keys = [k async for k in redis.scan_iter(match=settings.key_prefix + "*", count=1000)]
        counters = [k for k in keys if k[len(settings.key_prefix) :].startswith(COUNTERS)]
        ttls = [await redis.ttl(k) for k in counters]
    finally:
        await redis.aclose()
    # Known core gap (see the rabbitmq crash test): a worker killed inside the
    # finalizer's clean-up may leave a counter of a finished run; it still expires.
    assert all(0 < t <= client.state_ttl_seconds for t in ttls), (counters, ttls)
    assert len(counters) <= 5, f"coordination counters left behind: {counters}"


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(blueprints())
    spawn = workers.spawn
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        progress = Progress(client, runs, fleet.effects_path)

        def respawn() -> object:  # called right after each SIGKILL
            progress.kills.append(time.monotonic())
            return spawn()

        workers.spawn = respawn  # type: ignore[method-assign]
        started = time.monotonic()
        kills = await workers.kill_one_repeatedly(progress.until_all(300), seed=5, max_kills=8)
        elapsed = time.monotonic() - started
        recoveries = progress.recoveries()
        print(
            f"\n{RUNS} diamond runs in {elapsed:.1f} s with {kills} kills; kill -> next node "
            f"execution: {', '.join(f'{r:.2f}' for r in recoveries)} s "
            f"(max {max(recoveries, default=0):.2f} s)"
        )
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(fleet, client, runs)
        await check_nothing_left(fleet, client)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"


async def test_redis_restart_mid_run_loses_nothing(
    fleet: Settings, redis_service: RunningService
) -> None:
    """Redis (coordination and results) stops and starts, keeping its append-only file,
    while 200 diamond runs are in flight: the workers ride it out (their jobs are handed
    back and delivered again by Pub/Sub) and every run completes once."""
    restart = restarter(redis_service)
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(blueprints())
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        progress = Progress(client, runs, fleet.effects_path)
        await asyncio.sleep(2.0)
        assert await progress.published() < RUNS, "the runs finished before the restart"
        started = time.monotonic()
        await asyncio.to_thread(restart)
        await progress.until_all(300)
        took = time.monotonic() - started
        print(f"\nRedis restarted mid-run: all {RUNS} runs done {took:.1f} s later")
        await check_exactly_once(fleet, client, runs)
        await check_nothing_left(fleet, client)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
