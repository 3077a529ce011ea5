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
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    all_published,
    check_counters,
    check_exactly_once,
    client_options,
    restarter,
)
from flowcraft_gcp import GcpAdapter

from .gcp_fleet import Settings

# Past all_published's wait, its report of the unfinished runs (not a thread dump).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

RUNS = 200
FLEET = Path(__file__).with_name("gcp_fleet.py")


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


def published(client: GcpAdapter, runs: list[str]) -> Awaitable[None]:
    return all_published(
        client.redis, [client.results.key(r) for r in runs], 300, client=client, runs=runs
    )


async def check_nothing_left(settings: Settings, client: GcpAdapter) -> None:
    await asyncio.sleep(1.0)  # let acks in flight land
    assert await client.queue.pull(100) == [], "jobs left on the subscription"
    assert await client.dead_letters() == []
    assert await client.find_stalled_runs(0, 1000) == [], "a finished run is still indexed"
    await check_counters(settings.redis_url, settings.key_prefix, client.state_ttl_seconds)


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(client_options(fleet))
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        kills = await workers.kill_one_repeatedly(published(client, runs), seed=5, max_kills=8)
        print(workers.report(RUNS, kills))
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(client, runs, fleet.effects_path)
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
    client = fleet.adapter(client_options(fleet))
    try:
        runs = await workers.start_mid_run(client, RUNS)
        started = time.monotonic()
        await asyncio.to_thread(restart)
        await published(client, runs)
        took = time.monotonic() - started
        print(f"\nRedis restarted mid-run: all {RUNS} runs done {took:.1f} s later")
        await check_exactly_once(client, runs, fleet.effects_path)
        await check_nothing_left(fleet, client)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
