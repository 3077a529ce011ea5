"""Durable sleeps, event waits, signals and timeouts: in memory, and the distributed
base's parts the conformance kit does not reach (the reconciler as the scheduler of a
queue that cannot delay, token claims, the human-approval wait as a special case)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from flowcraft import CollectingEventBus, Flow, FlowRuntime, RunStatus, RuntimeOptions
from flowcraft.distributed import keys as K
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.errors import FlowcraftError, RunConflictError


def order_flow(timeout: str | None = "5s") -> Flow:
    return (
        Flow("order")
        .node("charge", lambda c: {"id": c.input or "o-1"})
        .wait_for("payment", "paid", token_from="input.id", timeout=timeout)
        .node("ship", lambda c: f"shipped {c.input['tx']}")
        .node("cancel", lambda c: "cancelled")
        .chain("charge", "payment")
        .edge("payment", "ship")
        .edge("payment", "cancel", action="timeout")
    )


def nap_flow(duration: float | str) -> Flow:
    return (
        Flow("nap")
        .node("a", lambda c: "x")
        .sleep("nap", duration)
        .node("b", lambda c: {"input": c.input, "at": time.time()})
        .chain("a", "nap", "b")
    )


# ---------------------------------------------------------------- in memory


async def test_a_sleep_within_the_bound_waits_in_the_process() -> None:
    result = await FlowRuntime(max_inline_sleep_ms=1000).run(nap_flow(20))
    assert result.status == "completed"
    assert result.output("b")["input"] == "x"
    # No bound (the default): every sleep waits in the process, as before.
    assert (await FlowRuntime().run(nap_flow("10ms"))).status == "completed"


async def test_a_sleep_past_the_bound_pauses_the_run_until_woken() -> None:
    bus = CollectingEventBus()
    runtime = FlowRuntime(max_inline_sleep_ms=50, event_bus=bus)
    started = time.time()
    paused = await runtime.run(nap_flow(300))
    assert paused.status == RunStatus.AWAITING
    assert paused.sleeping == ["nap"]
    assert paused.awaiting == []
    assert paused.wake_at is not None
    assert started + 0.3 <= paused.wake_at <= time.time() + 0.3
    assert paused.run_id in runtime.parked
    # Not due yet, and not waiting: nothing happens, the run stays paused.
    again = await runtime.wake(paused.run_id, wait=False)
    assert again.status == RunStatus.AWAITING
    assert again.sleeping == ["nap"]
    done = await runtime.wake(again.run_id)
    assert done.status == RunStatus.COMPLETED
    assert done.output("b")["at"] >= paused.wake_at
    assert paused.run_id not in runtime.parked
    assert [e.type for e in bus.events if e.node_id == "nap"] == [
        "node:start",
        "node:sleep",
        "node:wake",
        "node:finish",
    ]
    with pytest.raises(RunConflictError):
        await runtime.wake(paused.run_id)


async def test_a_paused_sleep_survives_the_process_through_its_saved_state() -> None:
    flow = nap_flow(200)
    paused = await FlowRuntime(max_inline_sleep_ms=0).run(flow)
    saved = json.loads(json.dumps(paused.state))
    other = FlowRuntime()  # another process: it knows the blueprint, not the run
    done = await other.wake(saved, target=flow)
    assert done.status == RunStatus.COMPLETED
    assert done.output("b")["input"] == "x"


async def test_signal_by_token_resumes_once_and_refuses_the_rest() -> None:
    bus = CollectingEventBus()
    runtime = FlowRuntime(event_bus=bus)
    flow = order_flow()
    with pytest.raises(RunConflictError):  # before the wait: refused, not buffered
        await runtime.signal("o-1", "paid", {"tx": 1})
    paused = await runtime.run(flow)
    assert paused.status == RunStatus.AWAITING
    assert paused.awaiting == ["payment"]
    with pytest.raises(RunConflictError):
        await runtime.signal("o-1", "refunded", {"tx": 1})
    done = await runtime.signal("o-1", "paid", {"tx": 7})
    assert done is not None
    assert done.status == RunStatus.COMPLETED
    assert done.output("ship") == "shipped 7"
    assert done.output("cancel") is None
    assert await runtime.signal("o-1", "paid", {"tx": 7}) is None  # the same: a duplicate
    assert await runtime.signal(paused.run_id, "paid", {"tx": 7}) is None
    with pytest.raises(RunConflictError):
        await runtime.signal("o-1", "paid", {"tx": 8})
    (signalled,) = [e for e in bus.events if e.type == "node:signal"]
    assert signalled.data == {
        "activation": 1,
        "event": "paid",
        "token": "o-1",
        "payload": {"tx": 7},
    }


async def test_concurrent_signals_resume_the_wait_once() -> None:
    runtime = FlowRuntime()
    paused = await runtime.run(order_flow(None))
    outcomes = await asyncio.gather(
        runtime.signal(paused.run_id, "paid", {"tx": 1}),
        runtime.signal("o-1", "paid", {"tx": 1}),
        return_exceptions=True,
    )
    resumed = [o for o in outcomes if o is not None and not isinstance(o, BaseException)]
    assert len(resumed) == 1, outcomes


async def test_a_timeout_takes_the_timeout_edge_and_then_refuses_signals() -> None:
    runtime = FlowRuntime()
    paused = await runtime.run(order_flow("150ms"))
    assert paused.wake_at is not None
    done = await runtime.wake(paused.run_id)
    assert done.status == RunStatus.COMPLETED
    assert done.output("cancel") == "cancelled"
    assert done.output("ship") is None
    with pytest.raises(RunConflictError):
        await runtime.signal("o-1", "paid", {"tx": 1})


async def test_the_plain_wait_is_the_human_approval_wait() -> None:
    flow = Flow("approve").wait("review").node("ok", lambda c: c.input).edge("review", "ok")
    runtime = FlowRuntime()
    paused = await runtime.run(flow)
    assert paused.awaiting == ["review"]
    assert paused.wake_at is None
    assert paused.run_id not in runtime.parked  # resumed with its state, as before
    with pytest.raises(RunConflictError):
        await runtime.signal(paused.run_id, "approved", True)
    done = await runtime.resume(flow, paused, output="yes")
    assert done.output("ok") == "yes"
    with pytest.raises(FlowcraftError):
        await runtime.wake(paused)


# ---------------------------------------------------------------- distributed


class _NoDelay(InMemoryAdapter):
    max_delay_seconds = 0.0


async def _worker(adapter: InMemoryAdapter) -> asyncio.Future[None]:
    task = asyncio.ensure_future(adapter.worker())
    await asyncio.sleep(0)
    return task


async def _until(check: Any, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if check():
                return
            await asyncio.sleep(0.01)


async def test_a_queue_that_cannot_delay_leaves_the_wake_up_to_the_reconciler() -> None:
    bus = CollectingEventBus()
    flow = nap_flow(300)
    broker = InMemoryBroker()
    adapter = _NoDelay(
        runtime_options=RuntimeOptions.from_flows(flow, event_bus=bus), broker=broker
    )
    task = await _worker(adapter)
    try:
        run = await adapter.start_run("nap")
        await _until(lambda: any(e.type == "node:sleep" for e in bus.events))
        await _until(broker.idle.is_set)  # the sleep's job was acked, not kept
        assert await adapter.reconcile(run) == 0  # not due: nothing to enqueue
        await asyncio.sleep(0.35)
        assert (await adapter.get_status(run)).status == "running"
        assert await adapter.reconcile(run) == 1  # due: the scheduler enqueues it
        result = await adapter.wait_for_result(run, 10)
        assert result.status == "completed"
        assert result.context["_outputs.b"]["input"] == "x"
    finally:
        await adapter.stop()
        await task


async def test_reconcile_leaves_a_sleep_in_the_queue_alone_until_it_is_due() -> None:
    flow = nap_flow(400)
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    task = await _worker(adapter)
    try:
        run = await adapter.start_run("nap")
        ctx = adapter.create_context(run)
        await _until(lambda: K.timer("nap") in broker.contexts.get(run, {}).data)
        info = await adapter.get_status(run)
        assert info.status == "running"
        assert [(t["nodeId"], t["kind"], t["event"]) for t in info.timers] == [
            ("nap", "sleep", None)
        ]
        assert time.time() < info.timers[0]["until"] <= time.time() + 0.4
        assert await adapter.reconcile(run) == 0
        result = await adapter.wait_for_result(run, 10)
        assert result.status == "completed"
        assert await ctx.get(K.timer("nap")) is None
    finally:
        await adapter.stop()
        await task


async def test_a_token_held_by_a_live_wait_fails_the_second_run_until_it_is_freed() -> None:
    flow = (
        Flow("hook")
        .wait_for("w", "ping", token="shared-token")
        .node("after", lambda c: c.input)
        .edge("w", "after")
    )
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    task = await _worker(adapter)
    try:
        first = await adapter.start_run("hook")
        await _until(lambda: K.waiting("w") in broker.contexts.get(first, Any).data)
        info = await adapter.get_status(first)
        assert (info.status, info.waiting) == ("awaiting", ["w"])
        assert info.timers == [
            {"nodeId": "w", "kind": "wait", "until": None, "event": "ping", "token": "shared-token"}
        ]
        second = await adapter.start_run("hook")
        failed = await adapter.wait_for_result(second, 10)
        assert failed.status == "failed"
        assert "shared-token" in failed.errors[0]["message"]
        assert await adapter.signal("shared-token", "ping", 1) is True
        assert (await adapter.wait_for_result(first, 10)).status == "completed"
        third = await adapter.start_run("hook")  # the first run's wait is over: taken over
        await _until(lambda: K.waiting("w") in broker.contexts.get(third, Any).data)
        assert await adapter.signal("shared-token", "ping", 3) is True
        assert (await adapter.wait_for_result(third, 10)).context["_outputs.after"] == 3
        assert await adapter.signal("shared-token", "ping", 3) is False
    finally:
        await adapter.stop()
        await task


async def test_resume_with_action_resolves_an_event_wait_and_its_timer() -> None:
    flow = order_flow("30s")
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    task = await _worker(adapter)
    try:
        run = await adapter.start_run("order", {"x": 1})
        await _until(lambda: K.waiting("payment") in broker.contexts.get(run, Any).data)
        await adapter.resume_with_action(run, output={"tx": 5})
        result = await adapter.wait_for_result(run, 10)
        assert result.context["_outputs.ship"] == "shipped 5"
        state = broker.contexts[run].data
        assert K.timer("payment") not in state
        assert state[K.signalled("payment")] == {"g": 1, "fp": "resume"}
        with pytest.raises(RunConflictError):
            await adapter.signal(run, "paid", {"tx": 5})
        with pytest.raises(FlowcraftError):
            await adapter.signal("no-such-run-or-token", "paid", None)
    finally:
        await adapter.stop()
        await task
