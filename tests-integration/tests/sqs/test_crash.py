"""Crash test on moto: two worker processes, one SIGKILLed again and again while diamond
runs go through. Every run must complete exactly once, no join may fire early, every
publication of a run must be the same result, and nothing may be left in the queues.
The time from each kill to the next node execution is printed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    check_exactly_once,
    client_options,
    history_drainer,
)
from flowcraft_sqs import AwsClients, SqsAdapter, create_queues, create_table

from .sqs_fleet import Settings

pytestmark = pytest.mark.slow

RUNS = 8
FLEET = Path(__file__).with_name("sqs_fleet.py")


@pytest.fixture
async def fleet(moto_service: RunningService, tmp_path: Path) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    extra = moto_service.extra
    settings = Settings(
        endpoint_url=moto_service.url,
        region=extra["region"],
        access_key=extra["aws_access_key_id"],
        queue_url="",
        table=f"crash-{tag}",
        namespace=f"crash-{tag}",
        effects_path=str(tmp_path / "effects.jsonl"),
    )
    clients = AwsClients(settings.aws())
    try:
        await create_table(clients, settings.table)
        queues = await create_queues(clients, f"crash-{tag}", visibility_timeout=3)
        settings.queue_url = queues.queue_url
        yield settings
        await clients.dynamodb_call("delete_table", TableName=settings.table)
        for url in (queues.queue_url, queues.dead_letter_queue_url):
            await clients.sqs_call("delete_queue", QueueUrl=url)
    finally:
        clients.close()


async def published(client: SqsAdapter, runs: list[str]) -> int:
    found = await asyncio.gather(*(client.runs.read_result(r) for r in runs))
    return sum(1 for f in found if f is not None)


async def wait_all(client: SqsAdapter, runs: list[str], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await published(client, runs) == len(runs):
                return
            await asyncio.sleep(0.5)


async def check_nothing_left(client: SqsAdapter) -> None:
    async def depth() -> int:
        attributes = (
            await client.clients.sqs_call(
                "get_queue_attributes",
                QueueUrl=client.queue_url,
                AttributeNames=[
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                ],
            )
        )["Attributes"]
        return sum(int(v) for v in attributes.values())

    async with asyncio.timeout(30):
        while True:
            if not await depth():
                break
            await asyncio.sleep(0.5)
    assert await client.dead_letters() == []
    assert await client.find_stalled_runs(0) == [], "a finished run is still indexed as active"


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    """The workers only spool history here, and one drainer stores it (as
    ``flowcraft worker --history-drainer`` runs them): a killed worker's spool is
    stored whole and nothing twice."""
    fleet.history_drainer = True
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(client_options(fleet))
    try:
        async with history_drainer(fleet.effects_path):
            runs = [await client.start_run("diamond") for _ in range(RUNS)]
            done = wait_all(client, runs, 240)
            # Its 8 runs are too few to wait for each new worker to work before its kill.
            kills = await workers.kill_one_repeatedly(
                done, seed=7, max_kills=6, until_working=False
            )
            print(workers.report(RUNS, kills))
            assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
            await check_exactly_once(client, runs, fleet.effects_path)
        await check_nothing_left(client)
    finally:
        codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
