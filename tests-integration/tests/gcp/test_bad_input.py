"""Bad jobs put on the topic with Google's own client (not the adapter): raw garbage,
an unknown blueprint, an unknown node. Each is dead-lettered with its reason while the
worker keeps running, and a good run still completes after them."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio
from google.cloud import pubsub_v1

from flowcraft import Flow, RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_gcp import GcpAdapter

BAD = {
    b"\x00\xff garbage {": "PayloadDecodeError",
    b'{"runId": "r1"}': "PayloadDecodeError",
    json.dumps({"runId": "r2", "blueprintId": "nope", "nodeId": "start"}).encode(): (
        "UnknownBlueprintError"
    ),
    json.dumps({"runId": "known", "blueprintId": "ok", "nodeId": "nope"}).encode(): (
        "UnknownNodeError"
    ),
}


FLOW = Flow("ok").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).chain("a", "b")


@pytest.fixture
async def adapter(
    pubsub_service: RunningService,
    firestore_service: RunningService,
    redis_service: RunningService,
) -> AsyncIterator[GcpAdapter]:
    os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_service.url
    os.environ["FIRESTORE_EMULATOR_HOST"] = firestore_service.url
    tag = uuid.uuid4().hex[:10]
    made = GcpAdapter(
        runtime_options=RuntimeOptions.from_flows(FLOW),
        project=f"fc-bad-{tag}",
        redis_url=redis_service.url,
        key_prefix=f"fc-bad:{tag}:",
        ack_deadline_seconds=10,
        pull_timeout_seconds=1.0,
    )
    yield made
    await made.aclose()
    redis = redis_asyncio.Redis.from_url(redis_service.url)
    try:
        keys = [k async for k in redis.scan_iter(match=f"fc-bad:{tag}:*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


async def test_bad_jobs_are_dead_lettered_and_the_worker_keeps_running(
    adapter: GcpAdapter,
) -> None:
    await adapter.start_run("ok", run_id="known")  # the unknown node's job names a real run
    publisher = pubsub_v1.PublisherClient()  # Google's own client, not the adapter's
    futures = [publisher.publish(adapter.queue.topic_path, body) for body in BAD]
    for future in futures:
        await asyncio.to_thread(future.result, 30)
    worker = asyncio.ensure_future(adapter.worker())
    try:
        async with asyncio.timeout(60):
            while len(letters := await adapter.dead_letters()) < len(BAD):
                assert not worker.done(), worker
                await asyncio.sleep(0.2)
        assert len(letters) == len(BAD)
        for body, error in BAD.items():
            found = [
                letter
                for letter in letters
                if letter.reason.startswith(error) and _same(letter.body, body)
            ]
            assert found, (body, error, letters)
        assert not worker.done(), "the worker stopped"
        for run in ("known", await adapter.start_run("ok")):
            result = await adapter.wait_for_result(run, 30)
            assert result.status == "completed"
            assert result.context["_outputs.b"] == 2
        assert not worker.done()
    finally:
        await adapter.stop()
        await asyncio.wait_for(worker, 30)


def _same(listed: str, body: bytes) -> bool:
    return listed == body.decode("utf-8", "backslashreplace")
