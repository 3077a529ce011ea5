"""What a node job costs in Redis commands, watched with MONITOR on a real Redis.

The issue's budget is at most 5 client-issued commands per non-join node job (the
original issues 9.4). The fast path (fused read + lease, write-behind done marks) and
fetch-next are what keep it there; if a change in the base handler's reads made the
fast path fall back silently, this is the test that notices. Counted: commands the
worker's connections send (a script counts once), not what scripts run inside Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import Flow, RuntimeOptions

from .conftest import BullMQFactory

pytestmark = pytest.mark.timeout(120)

RUNS = 20
DRIVER = "fc-cost-driver"


def chain(length: int) -> Flow:
    flow = Flow(f"chain{length}").node("n0", lambda c: 0)
    for i in range(1, length):
        flow.node(f"n{i}", lambda c: c.input + 1).edge(f"n{i - 1}", f"n{i}")
    return flow


async def worker_commands(
    redis_url: str, factory: BullMQFactory, flow: Flow, **settings: Any
) -> Counter[str]:
    """Client-issued commands of one worker while ``RUNS`` runs of ``flow`` run at once."""
    options = RuntimeOptions.from_flows(flow)
    client = factory(options, redis_options={"client_name": DRIVER})
    worker = factory(options, **settings)
    watcher = redis_asyncio.Redis.from_url(redis_url, client_name=DRIVER)
    seen: list[dict[str, Any]] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async with watcher.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                seen.append(command)

    watching = asyncio.ensure_future(watch())
    task = asyncio.ensure_future(worker.worker())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        runs = [await client.start_run(flow.id) for _ in range(RUNS)]
        for run_id in runs:
            result = await client.wait_for_result(run_id, 60)
            assert result.status == "completed", result.errors
        drivers = {c["addr"] for c in await watcher.client_list() if c.get("name") == DRIVER}
    finally:
        await worker.stop()
        await task
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await watcher.aclose()
    issued: Counter[str] = Counter()
    for command in seen:
        address = f"{command['client_address']}:{command['client_port']}"
        if command["client_type"] == "lua" or address in drivers:
            continue
        issued[command["command"].split(" ", 1)[0].strip('"').lower()] += 1
    return issued


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "base-calls"])
async def test_client_commands_per_non_join_node_job(
    redis_url: str, bullmq_factory: BullMQFactory, fast_path: bool
) -> None:
    """The marginal cost of a chain job: (chain of 20 - chain of 10) / (runs x 10), so
    start, finalization and publication drop out."""
    short = await worker_commands(redis_url, bullmq_factory, chain(10), fast_path=fast_path)
    long = await worker_commands(redis_url, bullmq_factory, chain(20), fast_path=fast_path)
    per_job = (sum(long.values()) - sum(short.values())) / (RUNS * 10)
    if fast_path:
        assert per_job <= 5, (per_job, long)
        # The fused read replaced the base's two HMGETs and its lease SET.
        assert long["hmget"] == short["hmget"], (short, long)
    else:
        # Without it, each job reads twice and takes its lease with commands of its own.
        assert per_job >= 6.5, (per_job, long)
