"""Bad jobs put on the Cloudflare Queue with the queue's own producer API (the Worker's
``env.JOBS.send`` of the bytes as they are, no flowcraft envelope): raw garbage, an
unknown blueprint, an unknown node. The queue consumer files them in the default inbox,
where each is dead-lettered with its reason while the worker keeps running, and a good
run still completes after them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from flowcraft import Flow, RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_cloudflare import CloudflareAdapter, WorkerSettings, worker_dir

BAD = {
    b"\x00\xff garbage {": "PayloadDecodeError",
    b'{"runId": "r1"}': "PayloadDecodeError",
    json.dumps({"runId": "r2", "blueprintId": "nope", "nodeId": "start"}).encode(): (
        "UnknownBlueprintError"
    ),
    json.dumps({"runId": "r3", "blueprintId": "ok", "nodeId": "nope"}).encode(): (
        "UnknownNodeError"
    ),
}

FLOW = Flow("ok").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).chain("a", "b")


@pytest.fixture
async def adapter(miniflare_service: RunningService) -> AsyncIterator[CloudflareAdapter]:
    config = json.loads((worker_dir() / "miniflare.json").read_text())
    made = CloudflareAdapter(
        runtime_options=RuntimeOptions.from_flows(FLOW),
        settings=WorkerSettings(
            url=miniflare_service.url, secret=config["bindings"]["FLOWCRAFT_SECRET"]
        ),
        queue_name=config["bindings"]["DEFAULT_INBOX"],  # where envelope-less messages go
        namespace=f"bad-{uuid.uuid4().hex[:10]}",
        poll_seconds=1.0,
    )
    await made.inbox.purge()
    yield made
    await made.inbox.purge()
    await made.aclose()


async def test_bad_jobs_are_dead_lettered_and_the_worker_keeps_running(
    adapter: CloudflareAdapter,
) -> None:
    await adapter.start_run("ok", run_id="r3")  # r3 exists: its job for "nope" names no node
    for body in BAD:
        await adapter.inbox.send_raw(body)
    worker = asyncio.ensure_future(adapter.worker())
    try:
        async with asyncio.timeout(60):
            while len(letters := await adapter.dead_letters()) < len(BAD):
                assert not worker.done(), worker
                await asyncio.sleep(0.2)
        assert len(letters) == len(BAD)
        for body, error in BAD.items():
            text = body.decode("utf-8", "replace")
            found = [letter for letter in letters if letter.body == text]
            assert len(found) == 1, (text, letters)
            assert found[0].reason.startswith(error), found[0].reason
        run = await adapter.start_run("ok")
        result = await adapter.wait_for_result(run, 30)
        assert result.status == "completed"
        assert result.context["_outputs.b"] == 2
        assert not worker.done()
        assert (await adapter.wait_for_result("r3", 30)).status == "completed"
        async with asyncio.timeout(10):  # the last acks leave in a batch
            while True:
                if not (await adapter.inbox.stats()).hidden:
                    break
                await asyncio.sleep(0.1)
        stats = await adapter.inbox.stats()
        assert (stats.ready, stats.hidden, stats.dead) == (0, 0, len(BAD))
    finally:
        await adapter.stop()
        await worker
