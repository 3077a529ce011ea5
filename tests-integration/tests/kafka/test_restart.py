"""Kafka, then Cassandra, stops and starts (keeping its data) while diamond runs are in
flight on two worker processes: the workers retry or hand jobs back while it is down,
reconnect, and every run completes exactly once. Needs backends this test may restart:
the local ones (``FLOWCRAFT_BACKENDS_DOCKER=0``), or ``FLOWCRAFT_TEST_<NAME>_RESTART``
(``docker compose restart <name>``) with an address given in the environment."""

from __future__ import annotations

import asyncio
import uuid
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
from flowcraft_kafka import KafkaAdapter

from .kafka_fleet import Settings
from .test_crash import fleet  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

RUNS = 30
FLEET = Path(__file__).with_name("kafka_fleet.py")


async def start_retrying(client: KafkaAdapter) -> str:
    """Start a run as an operator does while a backend restarts: the same run id again
    until it is accepted (start_run is idempotent per run id)."""
    run_id = uuid.uuid4().hex
    async with asyncio.timeout(180):
        while True:
            try:
                return await client.start_run("diamond", run_id=run_id)
            except Exception:
                await asyncio.sleep(1.0)


@pytest.mark.parametrize("backend", ["kafka", "cassandra"])
async def test_backend_restart_mid_run_loses_nothing(
    fleet: Settings,  # noqa: F811
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    service: RunningService = request.getfixturevalue(f"{backend}_service")
    restart = restarter(service)
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(client_options(fleet))
    try:
        runs = await workers.start_mid_run(client, RUNS)
        await asyncio.to_thread(restart)
        more = [await start_retrying(client) for _ in range(5)]
        keys = [client.results.key(r) for r in runs + more]
        await all_published(client.redis, keys, 240, client=client, runs=runs + more)
        await check_exactly_once(client, runs + more, fleet.effects_path)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
