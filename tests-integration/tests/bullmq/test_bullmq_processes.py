"""BullMQAdapter with real worker processes: 200 diamond runs on 2 workers, the same
while one worker is SIGKILLed and restarted again and again, and while Redis restarts."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft.distributed import keys as K
from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import restarter
from flowcraft_bullmq import BullMQAdapter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

WORKER = Path(__file__).with_name("worker_proc.py")
_spec = importlib.util.spec_from_file_location("bullmq_worker_proc", WORKER)
assert _spec is not None
assert _spec.loader is not None
worker_proc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker_proc)

RUNS = 200
NODES = ["start", "join", "end", *(f"b{i}" for i in range(worker_proc.WIDTH))]
JOIN_VALUE = sum(1 + i for i in range(worker_proc.WIDTH))


class WorkerProcess:
    def __init__(self, url: str, prefix: str, concurrency: int, sleep: float) -> None:
        argv = [sys.executable, str(WORKER), url, prefix, str(concurrency), str(sleep)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready", "worker did not start"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def prefix() -> str:
    return f"fcproc-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def redis(redis_service: RunningService, prefix: str) -> AsyncIterator[Any]:
    client = redis_asyncio.Redis.from_url(redis_service.url, decode_responses=True)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=2000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])
    await client.aclose()


@pytest.fixture
async def client(redis_service: RunningService, prefix: str) -> AsyncIterator[BullMQAdapter]:
    async def noop(*args: Any) -> None:
        return None

    flow = worker_proc.diamond(noop, 0.0)
    made = BullMQAdapter(
        runtime_options=worker_proc.options(flow),
        connection=redis_service.url,
        key_prefix=prefix,
        reconcile_interval_seconds=None,
    )
    yield made
    await made.aclose()


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


NODE_SECONDS = 0.06


async def start_runs(client: BullMQAdapter) -> list[str]:
    return list(await asyncio.gather(*(client.start_run("diamond") for _ in range(RUNS))))


async def wait_all(client: BullMQAdapter, runs: list[str], seconds: float) -> None:
    """Every run's result published, then its final status recorded: that comes last,
    after the run's counters are tidied away, which check_runs looks at."""
    async with asyncio.timeout(seconds):
        for run_id in runs:
            await client.wait_for_result(run_id, seconds)
        for run_id in runs:
            while not await recorded(client, run_id):  # noqa: ASYNC110 (another process writes it)
                await asyncio.sleep(0.05)


async def recorded(client: BullMQAdapter, run_id: str) -> bool:
    record = await client.create_context(run_id).get(K.STATUS) or {}
    return record.get("status") in ("completed", "failed")


async def check_runs(client: BullMQAdapter, redis: Any, prefix: str, runs: list[str]) -> None:
    """Every run completed once with the right outputs; no join ran early; no
    coordination counters left; leases and done marks expire by themselves."""
    for run_id in runs:
        result = await client.get_final_result(run_id)
        assert result is not None, run_id
        assert result.status == "completed", (run_id, result.status, result.errors)
        assert result.context["_outputs.join"] == JOIN_VALUE
        assert result.context["_outputs.end"] == JOIN_VALUE * 2
        resolved = await client.create_context(run_id).get_many([K.resolved(n) for n in NODES])
        assert resolved == {K.resolved(n): 1 for n in NODES}, (run_id, resolved)
    assert await redis.lrange(f"{prefix}test:violations", 0, -1) == []
    left = [k async for k in redis.scan_iter(match=f"{prefix}*", count=2000)]
    counters = [k for k in left if k.split(":")[1] in ("join", "end", "latch", "fired")]
    assert counters == [], counters[:10]
    for key in left:
        kind = key.split(":")[1]
        if kind in ("lease", "done"):
            assert await redis.pttl(key) != -1, f"{key} never expires"


async def test_two_worker_processes_run_200_diamonds(
    redis_service: RunningService,
    redis: Any,
    client: BullMQAdapter,
    prefix: str,
    workers: list[WorkerProcess],
) -> None:
    workers += [WorkerProcess(redis_service.url, prefix, 16, 0.0) for _ in range(2)]
    runs = await start_runs(client)
    await wait_all(client, runs, 120)
    await check_runs(client, redis, prefix, runs)
    execs = await redis.hgetall(f"{prefix}test:execs")
    assert len(execs) == RUNS * len(NODES)
    assert set(execs.values()) == {"1"}, "a node ran twice without any crash"


async def orphans_of_kill(redis: Any, prefix: str, before: dict[str, str | None]) -> list[str]:
    """Jobs active at the kill whose lock the survivor did not change in 0.5 s: the dead
    worker's (the survivor finishes its own in milliseconds)."""
    await asyncio.sleep(0.5)
    bull = f"{prefix}bull:flowcraft:"
    orphans = []
    for job_id, token in before.items():
        if token is not None and await redis.get(f"{bull}{job_id}:lock") == token:
            orphans.append(job_id)
    return orphans


async def test_sigkill_and_restart_while_200_diamonds_run(
    redis_service: RunningService,
    redis: Any,
    client: BullMQAdapter,
    prefix: str,
    workers: list[WorkerProcess],
) -> None:
    url = redis_service.url
    # Nodes take 60 ms, so the 3,800 jobs last ~14 s at 2 x 8 slots however fast the
    # machine: long enough for several kill-and-recover cycles (~6.5 s each).
    workers += [WorkerProcess(url, prefix, 8, NODE_SECONDS) for _ in range(2)]
    runs = await start_runs(client)
    bull = f"{prefix}bull:flowcraft:"
    recoveries: list[float] = []
    kills = 0
    while kills < 4:
        await asyncio.sleep(1.0)
        if await redis.llen(f"{bull}active") == 0 and await redis.llen(f"{bull}wait") == 0:
            break
        active = await redis.lrange(f"{bull}active", 0, -1)
        victim = workers.pop(0)
        victim.kill()
        killed_at = time.monotonic()
        kills += 1
        tokens = [await redis.get(f"{bull}{j}:lock") for j in active]
        workers.append(WorkerProcess(url, prefix, 8, NODE_SECONDS))
        orphans = await orphans_of_kill(redis, prefix, dict(zip(active, tokens, strict=True)))
        # The dead worker's jobs are "moving again" once they completed (removed).
        async with asyncio.timeout(60):
            while orphans and any([await redis.exists(f"{bull}{j}") for j in orphans]):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        if orphans:
            recoveries.append(time.monotonic() - killed_at)
    await wait_all(client, runs, 120)
    await check_runs(client, redis, prefix, runs)
    execs = await redis.hgetall(f"{prefix}test:execs")
    assert len(execs) == RUNS * len(NODES)
    rerun = sum(int(v) - 1 for v in execs.values())
    print(
        f"\nbullmq crash test: {kills} SIGKILLs; kill-to-recovery of the dead worker's jobs "
        f"(s): {[round(r, 2) for r in recoveries]}; node executions repeated: {rerun}"
    )
    assert kills >= 2, "the runs finished before the worker could be killed twice"


async def test_redis_restart_mid_run_loses_nothing(
    redis_service: RunningService,
    redis: Any,
    client: BullMQAdapter,
    prefix: str,
    workers: list[WorkerProcess],
) -> None:
    """Redis stops and starts (keeping its append-only file) while runs are in flight:
    workers reconnect, every run completes once with the right outputs."""
    restart = restarter(redis_service)
    workers += [WorkerProcess(redis_service.url, prefix, 8, 0.02) for _ in range(2)]
    runs = await start_runs(client)
    await asyncio.sleep(0.5)
    assert await client.get_final_result(runs[-1]) is None, "the runs finished too soon"
    await asyncio.to_thread(restart)
    more = list(await asyncio.gather(*(client.start_run("diamond") for _ in range(10))))
    await wait_all(client, runs + more, 180)
    await check_runs(client, redis, prefix, runs + more)
    execs = await redis.hgetall(f"{prefix}test:execs")
    assert len(execs) == (RUNS + 10) * len(NODES)
