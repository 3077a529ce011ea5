"""BullMQAdapter end to end against a real Redis, beyond the conformance kit
(test_conformance.py): BullMQ's dead-letter set, the progress index and the
reconciler, graceful stop, a given client, the fast path on and off. The fleets and the
side-effect records are the kit's (``flowcraft.testing``)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.testing import SideEffects
from flowcraft_bullmq import BullMQAdapter

from .conftest import StartFleet

pytestmark = pytest.mark.timeout(120)


def outputs(result: Any) -> dict[str, Any]:
    return {k[9:]: v for k, v in result.context.items() if k.startswith("_outputs.")}


def diamond(fx: SideEffects, width: int = 16) -> Flow:
    flow = Flow("diamond").node("start", fx.step(lambda c: 1))
    flow.node("join", fx.step(lambda c: sum(c.input.values())))
    flow.node("end", fx.step(lambda c: c.input * 2))
    for i in range(width):
        flow.node(f"b{i}", fx.step(lambda c, i=i: c.input + i))
        flow.edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


async def test_diamond_all_join(start_fleet: StartFleet) -> None:
    fx = SideEffects()
    fleet = await start_fleet(diamond(fx), workers=2)
    runs = [await fleet.client.start_run("diamond") for _ in range(5)]
    for run_id in runs:
        result = await fleet.client.wait_for_result(run_id, 30)
        assert result.status == "completed", result.errors
        expected_join = sum(1 + i for i in range(16))
        assert outputs(result)["join"] == expected_join
        assert outputs(result)["end"] == expected_join * 2
        assert fx.ran(run_id, "join") == 1
    assert set(fx.calls.values()) == {1}, "an activation ran twice"


async def test_wait_then_resume_with_action(start_fleet: StartFleet) -> None:
    fx = SideEffects()
    flow = (
        Flow("approval")
        .node("draft", fx.step(lambda c: "draft text"))
        .wait("review")
        .node("publish", fx.step(lambda c: f"published: {c.input}"))
        .node("discard", fx.step(lambda c: "discarded"))
        .chain("draft", "review")
        .edge("review", "publish", action="approve")
        .edge("review", "discard", action="reject")
    )
    fleet = await start_fleet(flow)
    run_id = await fleet.client.start_run("approval")

    async def paused() -> bool:
        return await fleet.status(run_id) == "awaiting"

    await fleet.until(paused, "the run to pause")
    assert (await fleet.client.get_status(run_id)).waiting == ["review"]
    # A waiting run is not "stalled": it leaves the reconciler's index.
    assert await fleet.client.client.zscore(fleet.client.keys.active, run_id) is None
    await fleet.client.resume_with_action(run_id, "approve", output="final text")
    result = await fleet.client.wait_for_result(run_id, 30)
    assert result.status == "completed", result.errors
    assert outputs(result)["publish"] == "published: final text"
    assert fx.ran(run_id, "discard") == 0


async def test_duplicate_delivery_has_the_effect_of_one(start_fleet: StartFleet) -> None:
    """Every job enqueued twice: each activation commits once, the join fires once."""
    fx = SideEffects()
    fleet = await start_fleet(diamond(fx, width=6), workers=2)
    fleet.duplicate_enqueues = True
    runs = [await fleet.client.start_run("diamond") for _ in range(3)]
    for run_id in runs:
        result = await fleet.client.wait_for_result(run_id, 30)
        assert result.status == "completed", result.errors
        assert outputs(result)["join"] == sum(1 + i for i in range(6))
    committed = Counter(k.rsplit(":", 2)[0] for k in fx.calls)
    assert all(v == 9 for v in committed.values()), committed
    published = [
        json.loads(await fleet.client.client.get(fleet.client.keys.result(r))) for r in runs
    ]
    assert all(p["status"] == "completed" for p in published)


async def test_queue_retry_mode_counts_attempts(start_fleet: StartFleet) -> None:
    attempts: list[tuple[int, bool]] = []

    async def flaky(ctx: NodeContext) -> str:
        attempts.append(ctx.attempt)  # type: ignore[arg-type]
        await ctx.set(f"attempt{ctx.attempt}", True)
        if ctx.attempt < 3:
            raise RuntimeError("transient")
        return f"ok on {ctx.attempt}"

    flow = (
        Flow("qretry")
        .node("f", flaky, max_retries=3, retry_delay=50)
        .node("g", lambda c: c.input)
        .chain("f", "g")
    )
    fleet = await start_fleet(flow, retry_mode="queue")
    result = await fleet.run("qretry")
    assert result.status == "completed", result.errors
    assert attempts == [1, 2, 3]
    assert outputs(result)["g"] == "ok on 3"
    assert "attempt1" not in result.context, "a failed attempt's writes leaked"


async def test_bad_payloads_are_dead_lettered(start_fleet: StartFleet) -> None:
    flow = Flow("ok").node("a", lambda c: 1)
    fleet = await start_fleet(flow, workers=1)
    client = fleet.client
    # The run exists: a node it lacks is then told from a version this worker lacks.
    assert (await client.wait_for_result(await client.start_run("ok", run_id="r"), 30)).status
    await client.enqueue_raw(b"{not json")
    await client.enqueue_raw({"runId": "r", "blueprintId": "nope", "nodeId": "a"})
    await client.enqueue_raw({"runId": "r", "blueprintId": "ok", "nodeId": "missing"})
    await client.enqueue_raw([1, 2, 3])

    async def four() -> bool:
        return len(await client.dead_letters()) >= 4

    await fleet.until(four, "four dead letters")
    errors = " | ".join(d.reason for d in await client.dead_letters())
    assert "not JSON" in errors
    assert "no blueprint 'nope'" in errors
    assert "has no node 'missing'" in errors
    assert "must be a JSON object" in errors
    # The worker survived: a real run still completes.
    result = await fleet.run("ok")
    assert result.status == "completed", result.errors


async def test_reconciler_redrives_a_run_whose_job_was_lost(start_fleet: StartFleet) -> None:
    fx = SideEffects()
    flow = (
        Flow("lossy")
        .node("a", fx.step(lambda c: 1))
        .node("b", fx.step(lambda c: c.input + 1))
        .chain("a", "b")
    )
    fleet = await start_fleet(flow, workers=1)
    fleet.drop_next_enqueue(lambda job: job.node_id == "b")
    run_id = await fleet.client.start_run("lossy")
    await fleet.until(
        lambda: fx.ran(run_id, "a") == 1 and fleet.dropped, "node a to run and b's job to be lost"
    )
    assert await fleet.client.reconcile_stalled(older_than_seconds=60) == {}
    await asyncio.sleep(0.05)
    redriven = await fleet.client.reconcile_stalled(older_than_seconds=0.01)
    assert list(redriven) == [run_id]
    result = await fleet.client.wait_for_result(run_id, 30)
    assert result.status == "completed", result.errors
    assert outputs(result)["b"] == 2

    async def left_the_index() -> bool:
        # The final status is recorded (and the run leaves the index) after publication.
        return await fleet.client.client.zscore(fleet.client.keys.active, run_id) is None

    await fleet.until(left_the_index, "the finished run to leave the index")


async def test_graceful_stop_finishes_jobs_in_hand(start_fleet: StartFleet) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: NodeContext) -> str:
        started.set()
        await release.wait()
        return "finished"

    flow = Flow("slow").node("s", slow).node("t", lambda c: c.input).chain("s", "t")
    fleet = await start_fleet(flow, workers=0)
    (worker,) = await fleet.start(1)
    run_id = await fleet.client.start_run("slow")
    await asyncio.wait_for(started.wait(), 30)
    await worker.stop()
    await asyncio.sleep(0.2)
    assert fleet.dead_workers() == [], "stop() must wait for the job in hand"
    release.set()
    await fleet.stop([worker])  # waits for it (30 s at most)
    # Node "s" committed before the worker left; "t" waits in the queue for a worker.
    ctx = fleet.client.create_context(run_id)
    assert await ctx.get("_outputs.s") == "finished"
    await fleet.start(1)
    result = await fleet.client.wait_for_result(run_id, 30)
    assert outputs(result)["t"] == "finished"


async def test_given_client_is_left_open(redis_url: str, prefix: str) -> None:
    client = redis_asyncio.Redis.from_url(redis_url, decode_responses=True)
    fx = SideEffects()
    flow = Flow("given").node("a", fx.step(lambda c: "x")).node("b", fx.step())
    flow.chain("a", "b")
    options = RuntimeOptions.from_flows(flow)
    worker = BullMQAdapter(runtime_options=options, connection=client, key_prefix=prefix)
    task = asyncio.ensure_future(worker.worker())
    try:
        run_id = await worker.start_run("given")
        result = await worker.wait_for_result(run_id, 30)
        assert outputs(result) == {"a": "x", "b": "x"}
    finally:
        await worker.stop()
        await task
        await worker.aclose()
    assert await client.ping()
    await client.aclose()


async def test_fast_path_off_behaves_the_same(start_fleet: StartFleet) -> None:
    fx = SideEffects()
    fleet = await start_fleet(diamond(fx, width=4), fast_path=False)
    result = await fleet.run("diamond")
    assert result.status == "completed", result.errors
    assert outputs(result)["join"] == sum(1 + i for i in range(4))


def slow_flow(seconds: float) -> Flow:
    async def slow(ctx: NodeContext) -> str:
        await asyncio.sleep(seconds)
        return "done"

    return Flow("slowpoke").node("s", slow).node("t", lambda c: c.input).chain("s", "t")


async def test_wait_for_result_is_woken_by_the_publication(start_fleet: StartFleet) -> None:
    """The waiter's own polling would next look after 60 s: only the publication's
    PUBLISH can wake it within the 20 s allowed."""
    fleet = await start_fleet(slow_flow(0.5), workers=1)
    run_id = await fleet.client.start_run("slowpoke")
    result = await fleet.client.wait_for_result(run_id, 20, poll_interval=60)
    assert outputs(result) == {"s": "done", "t": "done"}


async def test_waiters_survive_a_lost_subscription(
    start_fleet: StartFleet, redis_client: redis_asyncio.Redis
) -> None:
    """The results subscription is killed while a client waits: it subscribes again,
    and the waiter still gets the result without waiting out its polling."""
    fleet = await start_fleet(slow_flow(2.0), workers=1)
    run_id = await fleet.client.start_run("slowpoke")
    waiting = asyncio.ensure_future(fleet.client.wait_for_result(run_id, 20, poll_interval=60))
    await fleet.until(
        lambda: fleet.client.results.waiters and fleet.client.results.listening,
        "a subscription",
    )
    killed = await redis_client.client_kill_filter(_type="pubsub")
    assert killed >= 1
    result = await waiting
    assert result.status == "completed", result.errors


async def test_queue_mode_hand_backs_do_not_use_up_attempts(start_fleet: StartFleet) -> None:
    """Every job is delivered twice; the second copy finds the first's lease held and is
    handed back every 0.2 s while the node runs (~7 times). When the first attempt
    fails (its retry backs off 2 s), the second copy takes the activation and runs it:
    as attempt 1, since hand-backs are not BullMQ attempts. The node only ever sees
    attempts 1 and 2 of its 2 (``max_retries`` counts attempts, as in the original)."""
    seen: list[int] = []

    async def flaky(ctx: NodeContext) -> str:
        seen.append(int(ctx.attempt or 0))
        await asyncio.sleep(1.5)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return "ok"

    flow = (
        Flow("handback")
        .node("f", flaky, max_retries=2, retry_delay=2000)
        .node("g", lambda c: c.input)
    )
    flow.chain("f", "g")
    fleet = await start_fleet(flow, workers=2, retry_mode="queue", lease_seconds=0.6)
    fleet.duplicate_enqueues = True
    result = await fleet.run("handback")
    assert result.status == "completed", result.errors
    assert outputs(result)["g"] == "ok"
    assert 2 in seen
    assert max(seen) <= 2, seen
    requeued = [e for e in fleet.events_of("job:requeued", result.run_id) if e.node_id == "f"]
    assert len(requeued) >= 3, "the second copy never waited on the lease"
