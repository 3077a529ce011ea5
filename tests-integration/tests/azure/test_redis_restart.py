"""Redis (coordination and results) stops and starts, keeping its append-only file,
while diamond runs are in flight on two worker processes: the workers hand jobs back
while it is down, reconnect, and every run completes exactly once. (Azurite and the
Cosmos DB test server keep everything in memory, so they cannot restart mid-run
without losing data; only Redis is restarted.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    all_published,
    check_exactly_once,
    client_options,
    restarter,
)

from .azure_fleet import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

RUNS = 30
FLEET = Path(__file__).with_name("azure_fleet.py")


async def test_redis_restart_mid_run_loses_nothing(
    settings: Settings, redis_service: RunningService
) -> None:
    restart = restarter(redis_service)
    workers = WorkerProcesses(FLEET, settings)
    client = settings.adapter(client_options(settings))
    try:
        runs = await workers.start_mid_run(client, RUNS)
        await asyncio.to_thread(restart)
        more = [await client.start_run("diamond") for _ in range(5)]
        assert client.results is not None
        keys = [client.results.key(r) for r in runs + more]
        await all_published(client.results._client, keys, 300, client=client, runs=runs + more)
        await check_exactly_once(client, runs + more, settings.effects_path)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
