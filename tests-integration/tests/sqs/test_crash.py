"""Crash test on moto: two worker processes, one SIGKILLed again and again while diamond
runs go through. Every run must complete exactly once, no join may fire early, every
publication of a run must be the same result, and nothing may be left in the queues."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowcraft_backends import RunningService
from flowcraft_sqs import AwsClients, SqsAdapter, create_queues, create_table

from .sqs_fleet import BRANCHES, Settings, blueprints, read_effects

pytestmark = pytest.mark.slow

RUNS = 8
FLEET = Path(__file__).with_name("sqs_fleet.py")
EXPECTED_END = sum(range(1, BRANCHES + 1))
NODES = ["start", "join", "end", *(f"b{i}" for i in range(BRANCHES))]


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


def spawn(settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(FLEET)], env={**os.environ, **settings.to_env()})


async def published(client: SqsAdapter, runs: list[str]) -> int:
    found = await asyncio.gather(*(client.runs.read_result(r) for r in runs))
    return sum(1 for f in found if f is not None)


async def wait_all(client: SqsAdapter, runs: list[str], seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await published(client, runs) == len(runs):
                return
            await asyncio.sleep(0.5)


async def check_exactly_once(settings: Settings, client: SqsAdapter, runs: list[str]) -> None:
    results = [await client.wait_for_result(r, 5) for r in runs]
    assert Counter(r.status for r in results) == {"completed": len(runs)}
    assert {r.context["_outputs.end"] for r in results} == {EXPECTED_END}
    for run in runs:
        state = await client.create_context(run).get_many(
            [f"_flowcraft.n.{n}" for n in NODES] + ["_flowcraft.status"]
        )
        assert state.pop("_flowcraft.status")["status"] == "completed"
        assert set(state.values()) == {1}, (run, state)  # each node resolved exactly once
        assert len(state) == len(NODES)
    effects = read_effects(settings.effects_path)
    early = [e for e in effects if e["node"] == "join" and e["n"] != BRANCHES]
    assert early == [], f"joins fired before all {BRANCHES} branches: {early[:5]}"
    publications: dict[str, set[str]] = {}
    for e in effects:
        if e["node"] == "__publish__":
            publications.setdefault(e["run"], set()).add(e["key"])
    assert set(publications) == set(runs)
    assert all(len(p) == 1 for p in publications.values()), "a run published two results"


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
    assert await client.peek_dead_letters() == []
    assert await client.find_stalled_runs(0) == [], "a finished run is still indexed as active"


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    workers = [spawn(fleet), spawn(fleet)]
    client = fleet.adapter(blueprints())
    rng = random.Random(7)
    kills = 0
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        pending = asyncio.ensure_future(wait_all(client, runs, 240))
        while not pending.done() and kills < 6:
            await asyncio.wait({pending}, timeout=rng.uniform(1.0, 2.5))
            if pending.done():
                break
            victim = workers[0]
            victim.send_signal(signal.SIGKILL)
            await asyncio.to_thread(victim.wait)
            kills += 1
            workers[0] = spawn(fleet)
        await pending
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(fleet, client, runs)
        await check_nothing_left(client)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for worker in workers:
            try:
                codes.append(await asyncio.wait_for(asyncio.to_thread(worker.wait), 20))
            except TimeoutError:
                worker.kill()
                codes.append(None)
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
