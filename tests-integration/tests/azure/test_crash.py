"""Crash test on Azurite, the Cosmos DB test server and Redis: two worker processes, one
SIGKILLed again and again while 200 diamond runs go through. Every run must complete
exactly once, no join may fire early, every publication of a run must be the same
result, and nothing may be left behind (queue, poison queue, coordination counters).
The time from each kill to the next node execution is printed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flowcraft_azure import AzureAdapter
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    all_published,
    check_counters,
    check_exactly_once,
    client_options,
)

from .azure_fleet import Settings

# 200 runs of 19 nodes through two Node emulators on a shared machine take minutes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RUNS = 200
FLEET = Path(__file__).with_name("azure_fleet.py")


async def check_nothing_left(settings: Settings, client: AzureAdapter) -> None:
    async with asyncio.timeout(30):  # killed workers' messages come back after 3 s
        while True:
            if not (await client.queue.queue.get_queue_properties()).approximate_message_count:
                break
            await asyncio.sleep(0.5)
    assert await client.dead_letters() == []
    await check_counters(settings.redis_url, settings.key_prefix, client.state_ttl_seconds)


async def test_two_workers_one_sigkilled_repeatedly(settings: Settings) -> None:
    workers = WorkerProcesses(FLEET, settings)
    client = settings.adapter(client_options(settings))
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        assert client.results is not None
        keys = [client.results.key(r) for r in runs]
        done = all_published(client.results._client, keys, 800, client=client, runs=runs)
        kills = await workers.kill_one_repeatedly(done, seed=11, max_kills=8)
        print(workers.report(RUNS, kills))
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(client, runs, settings.effects_path)
        await check_nothing_left(settings, client)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
