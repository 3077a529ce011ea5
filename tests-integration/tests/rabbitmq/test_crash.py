"""Crash tests on real servers: worker processes SIGKILLed again and again, and a RabbitMQ
restart in the middle of runs. Every run must complete exactly once, no join may fire
early, and nothing may be left behind (queues, dead letters, coordination counters)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    blueprints,
    client_options,
    restarter,
    run_worker,
)
from flowcraft_backends.crash_fleet import check_exactly_once as shared_check
from flowcraft_rabbitmq import RabbitMQAdapter

from .fleet import Settings

pytestmark = pytest.mark.slow

RUNS = 200
FLEET = Path(__file__).with_name("fleet.py")
COUNTERS = ("join:", "end:", "latch:", "fired:")


@pytest.fixture
async def fleet(
    rabbitmq_service: RunningService,
    postgres_service: RunningService,
    redis_service: RunningService,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        amqp_url=rabbitmq_service.url,
        postgres_dsn=postgres_service.url,
        redis_url=redis_service.url,
        queue_name=f"fc-crash-{tag}",
        table=f"fc_crash_{tag}",
        key_prefix=f"fc-crash:{tag}:",
        effects_path=str(tmp_path / "effects.jsonl"),
    )
    yield settings
    client = settings.adapter(blueprints())
    try:
        await client.broker.delete_topology()
    finally:
        await client.aclose()
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        names = client.store.names
        await conn.execute(f"DROP TABLE IF EXISTS {names.runs}, {names.versions}")
    finally:
        await conn.close()
    redis = redis_asyncio.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=settings.key_prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


async def wait_all(client: RabbitMQAdapter, runs: list[str], seconds: float) -> None:
    """Wait until every run has a published result (one query per poll, not one per run)."""
    pool = await client.store.pool()
    query = f"SELECT count(*) FROM {client.store.names.runs} WHERE result IS NOT NULL"
    async with asyncio.timeout(seconds):
        while True:
            if await pool.fetchval(query) >= len(runs):
                return
            await asyncio.sleep(0.2)


async def check_exactly_once(settings: Settings, client: RabbitMQAdapter, runs: list[str]) -> None:
    """No run but these in the runs table, each published; then the shared check (each
    run completed with the right output, each activation committed once, every join saw
    all its branches, every publication the same result, its history complete), which
    waits for a status a killed worker had not yet recorded."""
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        rows = await conn.fetch(
            f"SELECT run_id, result IS NOT NULL AS published FROM {client.store.names.runs}"
        )
    finally:
        await conn.close()
    assert sorted(row["run_id"] for row in rows) == sorted(runs)
    assert all(row["published"] for row in rows), [r["run_id"] for r in rows if not r["published"]]
    await shared_check(client, runs, settings.effects_path)


async def check_nothing_left(settings: Settings, client: RabbitMQAdapter) -> None:
    async def drained() -> dict[str, int]:
        return {k: v for k, v in (await client.broker.depths()).items() if v}

    async with asyncio.timeout(30):
        while left := await drained():
            if set(left) == {client.broker.topology.dead_queue}:
                break
            await asyncio.sleep(0.2)
    assert left == {}, f"messages left behind: {left}"
    assert await client.dead_letters() == []
    redis = redis_asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        keys = [k async for k in redis.scan_iter(match=settings.key_prefix + "*", count=1000)]
    finally:
        await redis.aclose()
    counters = [k for k in keys if k[len(settings.key_prefix) :].startswith(COUNTERS)]
    if counters:
        # Known core gap (see the package README): a worker killed inside the
        # finalizer's clean-up, or a redelivered follow-up racing it, leaves a
        # counter of a finished run. It must still expire (state_ttl_seconds).
        redis = redis_asyncio.Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            ttls = [await redis.ttl(k) for k in counters]
        finally:
            await redis.aclose()
        assert all(0 < t <= client.state_ttl_seconds for t in ttls), (counters, ttls)
        assert len(counters) <= 5, f"coordination counters left behind: {counters}"


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(client_options(fleet))
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        done = wait_all(client, runs, 240)
        kills = await workers.kill_one_repeatedly(done, seed=6, max_kills=8)
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(fleet, client, runs)
        await check_nothing_left(fleet, client)
    finally:
        await workers.stop()
        await client.aclose()


async def test_broker_restart_mid_run_loses_nothing(
    fleet: Settings, rabbitmq_service: RunningService
) -> None:
    restart = restarter(rabbitmq_service)
    client = fleet.adapter(client_options(fleet))
    worker_tasks = [asyncio.ensure_future(run_worker(fleet)) for _ in range(2)]
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS // 2)]
        first = await client.wait_for_result(runs[0], 60, poll_interval=0.05)
        assert first.status == "completed"
        await asyncio.to_thread(restart)
        more = [await client.start_run("diamond") for _ in range(10)]
        await wait_all(client, runs + more, 180)
        await check_exactly_once(fleet, client, runs + more)
        await check_nothing_left(fleet, client)
    finally:
        for task in worker_tasks:
            task.cancel()
        await asyncio.gather(*worker_tasks, return_exceptions=True)
        await client.aclose()
