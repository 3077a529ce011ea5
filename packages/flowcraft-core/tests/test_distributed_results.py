"""``wait_for_result`` woken through the ``watch_result`` hook, and ``ResultWaiters``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import FinalResult
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.distributed.results import ResultWaiters, ResultWatch


class NotifyingAdapter(InMemoryAdapter):
    """Wakes its waiters on publication, as an adapter with LISTEN/SUBSCRIBE does."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.waiters = ResultWaiters()

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        await super().publish_final_result(run_id, result)
        self.waiters.wake(run_id)

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        event = self.waiters.add(run_id)
        try:
            yield ResultWatch(event)
        finally:
            self.waiters.remove(run_id, event)


async def test_wait_for_result_returns_on_the_notification() -> None:
    """Polling would next look after 60 s; the test allows 10."""

    async def slow(ctx: NodeContext) -> str:
        await asyncio.sleep(0.2)
        return "late"

    flow = Flow("slow").node("s", slow)
    adapter = NotifyingAdapter(
        runtime_options=RuntimeOptions.from_flows(flow), broker=InMemoryBroker()
    )
    worker = asyncio.ensure_future(adapter.worker())
    try:
        run_id = await adapter.start_run("slow")
        result = await adapter.wait_for_result(run_id, 10, poll_interval=60)
        assert result.status == "completed"
        assert result.context["_outputs.s"] == "late"
        assert len(adapter.waiters) == 0, "a waiter was left behind"
    finally:
        await adapter.stop()
        await worker


def test_waiters_wake_their_run_only_and_all_on_demand() -> None:
    waiters = ResultWaiters()
    a1, a2, b = waiters.add("a"), waiters.add("a"), waiters.add("b")
    waiters.wake("a")
    assert a1.is_set()
    assert a2.is_set()
    assert not b.is_set()
    waiters.remove("a", a1)
    waiters.wake_all()
    assert b.is_set()
    waiters.remove("a", a2)
    waiters.remove("b", b)
    waiters.remove("b", b)  # twice: harmless
    b.clear()
    waiters.wake("b")
    assert not b.is_set()


async def test_a_lone_surrogate_in_the_initial_context_is_a_clear_error() -> None:
    import pytest

    from flowcraft import Flow, RuntimeOptions, SerializationError
    from flowcraft.distributed.memory import InMemoryAdapter

    flow = Flow("s").node("a", lambda ctx: 1)
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow))
    with pytest.raises(SerializationError, match="initial context"):
        await adapter.start_run("s", {"k": "x\udc00y"})
