"""What is particular to the Azure adapter, on the real servers: the consistency check
at start-up, 429 as a hand-back, results created in Cosmos DB and announced in Redis
(first wins in both), a fan-out past Cosmos DB's 10 operations per patch, hostile run
ids end to end, the poison limit on ``dequeue_count``."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from azure.cosmos.exceptions import CosmosHttpResponseError

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import FinalResult
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import RetryJob
from flowcraft_azure import ConsistencyError
from flowcraft_azure.context import throttled

from .conftest import Namespace


def _flows(*flows: Flow) -> RuntimeOptions:
    return RuntimeOptions.from_flows(*flows)


async def test_a_weaker_consistency_fails_at_start_up(namespace: Namespace) -> None:
    """The test server reports Session: a worker that requires Strong refuses to start,
    saying what to do; so does an operator call."""
    flow = Flow("one").node("a", lambda ctx: 1)
    adapter = namespace.adapter(_flows(flow), require_strong_consistency=True)
    with pytest.raises(ConsistencyError, match=r"Session.*Strong"):
        await asyncio.wait_for(adapter.worker(), 30)
    with pytest.raises(ConsistencyError, match="require_strong_consistency=False"):
        await adapter.start_run("one")


def test_throttling_becomes_a_hand_back_after_retry_after() -> None:
    response = SimpleNamespace(headers={"x-ms-retry-after-ms": "2500"}, status_code=429)
    exc = CosmosHttpResponseError(status_code=429, message="Request rate is large")
    exc.response = response  # type: ignore[assignment]
    retry = throttled(exc)
    assert isinstance(retry, RetryJob)
    assert retry.delay_seconds == 2.5
    exc.response = SimpleNamespace(headers={}, status_code=429)  # type: ignore[assignment]
    assert throttled(exc).delay_seconds == 1.0


async def test_the_first_result_stays_in_cosmos_and_redis(namespace: Namespace) -> None:
    adapter = namespace.adapter(RuntimeOptions())
    first = FinalResult("run/1#?", "completed", {"a": 1})
    await adapter.publish_final_result(first.run_id, first)
    await adapter.publish_final_result(
        first.run_id, FinalResult(first.run_id, "completed", {"a": 2})
    )
    assert (await adapter.get_final_result(first.run_id)) == first
    assert adapter.results is not None
    assert await adapter.results.read(first.run_id) == first
    # A publisher that died between the Cosmos DB create and the Redis announcement:
    # the next publication announces the FIRST result, not its own.
    second = FinalResult("run-2", "completed", {"x": "first"})
    await adapter.runs.write_result(second.run_id, second.to_json_dict())
    assert await adapter.get_final_result(second.run_id) == second, "read from Cosmos DB"
    await adapter.publish_final_result(
        second.run_id, FinalResult(second.run_id, "completed", {"x": "late"})
    )
    assert await adapter.results.read(second.run_id) == second


async def test_a_waiter_is_woken_by_the_publication(namespace: Namespace) -> None:
    client = namespace.adapter(RuntimeOptions())
    publisher = namespace.adapter(RuntimeOptions())
    async with client.watch_result("woken") as watch:
        assert watch is not None
        assert watch.live(), "the subscription is up"
        result = FinalResult("woken", "completed", {})
        await publisher.publish_final_result("woken", result)
        await asyncio.wait_for(watch.event.wait(), 10)
    assert await client.get_final_result("woken") == result


async def test_a_fan_out_past_ten_patch_operations_commits_whole(namespace: Namespace) -> None:
    """The start node's commit writes 24 activation records and its output: more than one
    ``patch_item`` takes, so it goes through the etag-guarded replace."""
    flow = Flow("wide").node("start", lambda ctx: 1)
    for i in range(24):
        flow.node(f"b{i}", lambda ctx, i=i: ctx.input + i).edge("start", f"b{i}")
        flow.edge(f"b{i}", "join")
    flow.node("join", lambda ctx: sum(ctx.input.values()))
    worker = namespace.adapter(_flows(flow))
    running = asyncio.ensure_future(worker.worker())
    try:
        run = await worker.start_run("wide", run_id="wide/run?#1")
        result = await worker.wait_for_result(run, 60)
        assert result.status == "completed", result.errors
        assert result.context["_outputs.join"] == sum(1 + i for i in range(24))
        assert worker.runs.requests["replace"] >= 1
    finally:
        await worker.stop()
        await running


async def test_hostile_run_ids_end_to_end(namespace: Namespace) -> None:
    async def echo(ctx: NodeContext) -> str:
        return ctx.run_id

    flow = Flow("echo").node("a", echo).node("b", lambda ctx: ctx.input)
    flow.chain("a", "b")
    worker = namespace.adapter(_flows(flow))
    running = asyncio.ensure_future(worker.worker())
    try:
        ids = ["a/b", "back\\slash", "q?#", "é 🚀", "x" * 400, "~" + "0" * 64]
        for run_id in ids:
            await worker.start_run("echo", run_id=run_id)
        for run_id in ids:
            result = await worker.wait_for_result(run_id, 60)
            assert result.context["_outputs.b"] == run_id
    finally:
        await worker.stop()
        await running


async def test_a_message_delivered_too_often_goes_to_the_poison_queue(
    namespace: Namespace,
) -> None:
    flow = Flow("one").node("a", lambda ctx: 1)
    worker = namespace.adapter(_flows(flow), max_deliveries=2)
    job = JobPayload(run_id="crashy", blueprint_id="one", node_id="a")
    await worker.enqueue_job(job)
    for _ in range(2):  # two workers took it and died (their visibility ran out)
        (message,) = await worker.queue.receive(1, 30)
        await worker.release(message, 0)
    running = asyncio.ensure_future(worker.worker())
    try:
        async with asyncio.timeout(30):
            while True:
                letters = await worker.dead_letters()
                if letters:
                    break
                await asyncio.sleep(0.1)
        (letter,) = letters
        assert "delivered 3 times" in letter.reason
        assert JobPayload.decode(letter.body) == job
    finally:
        await worker.stop()
        await running


async def test_the_reconciler_finds_and_finishes_a_run_whose_job_was_lost(
    namespace: Namespace,
) -> None:
    flow = Flow("lost").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1)
    flow.chain("a", "b")
    client = namespace.adapter(_flows(flow))
    done = await client.start_run("lost")
    lost = await client.start_run("lost")
    # Both start jobs are on the queue: let a worker finish one run, lose the other job.
    (first, second) = await client.queue.receive(2, 30)
    await client.ack([m for m in (first, second) if lost in m.body])
    await client.release(next(m for m in (first, second) if done in m.body), 0)
    worker = namespace.adapter(_flows(flow))
    running = asyncio.ensure_future(worker.worker())
    try:
        assert (await worker.wait_for_result(done, 30)).status == "completed"
        # _ts and the cutoff are whole seconds: a run written at 10.1 s is older than
        # 1 s only from 12.0 s on.
        await asyncio.sleep(2.1)
        assert await worker.find_stalled_runs(1.0, 10) == [lost]
        assert await worker.find_stalled_runs(60.0, 10) == []
    finally:
        await worker.stop()
        await running
    reconciling = namespace.adapter(
        _flows(flow), reconcile_interval_seconds=0.5, stalled_after_seconds=1.0
    )
    running = asyncio.ensure_future(reconciling.worker())
    try:
        result = await reconciling.wait_for_result(lost, 30)
        assert result.context["_outputs.b"] == 2
        # The run's final status is recorded just after its result is published (which
        # wakes wait_for_result): until then the run still reads as running.
        for _ in range(100):
            if not await reconciling.find_stalled_runs(0.0, 10):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the finished run still reads as stalled 10 s after its result")
    finally:
        await reconciling.stop()
        await running
