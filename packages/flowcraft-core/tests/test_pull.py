"""``PullingAdapter`` on a toy pull queue: the example of WRITING-AN-ADAPTER.md.

The toy queue behaves like SQS: a received message is invisible for a while and
comes back unless it is acknowledged. The adapter is all an author writes; the
conformance kit then proves it, and the tests below check the loop's own duties
(batched acks, renewals, releases that do not count as attempts, stop).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.context import (
    BaseAsyncContext,
    Context,
    Guard,
    PatchOperation,
    check_guard,
    guard_holds,
)
from flowcraft.distributed import DeadLetter, FinalResult, PullingAdapter
from flowcraft.distributed.coordination import InMemoryCoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.testing import AdapterConformanceTests, AdapterFactory, ContextStoreTests

# ---------------------------------------------------------------- the toy backend


@dataclass
class ToyMessage:
    id: int
    body: bytes
    receipt: int = 0
    deliveries: int = 0
    visible_at: float = 0.0


class ToyQueue:
    """Messages that hide for ``visibility`` seconds once received."""

    def __init__(self) -> None:
        self.messages: dict[int, ToyMessage] = {}
        self.dead: list[DeadLetter] = []
        self.results: dict[str, FinalResult] = {}  # the toy's result store
        self.calls: dict[str, int] = {"ack": 0, "renew": 0, "release": 0}
        self._ids = itertools.count(1)

    def put(self, body: bytes) -> None:
        message_id = next(self._ids)
        self.messages[message_id] = ToyMessage(message_id, body)

    def take(self, n: int, visibility: float) -> list[ToyMessage]:
        now = time.monotonic()
        ready = [m for m in self.messages.values() if m.visible_at <= now][:n]
        for m in ready:
            m.deliveries += 1
            m.receipt += 1
            m.visible_at = now + visibility
        return [ToyMessage(m.id, m.body, m.receipt, m.deliveries) for m in ready]

    def owned(self, message: ToyMessage) -> ToyMessage | None:
        """The stored message if ``message``'s receipt is still the newest."""
        stored = self.messages.get(message.id)
        return stored if stored is not None and stored.receipt == message.receipt else None


class ToyContext(BaseAsyncContext):
    """A run's state: a dict; ``patch`` applies a whole batch or, if the guard fails,
    nothing."""

    def __init__(self, data: Context) -> None:
        self._data = data

    async def get(self, key: str) -> Any:
        await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
        return self._data.data.get(key)

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        await asyncio.sleep(0)
        # Then one event-loop step: nothing interleaves between the check and the write.
        check_guard(guard)
        if guard is not None and not guard_holds(self._data.data, guard):
            return False
        self._data.apply(list(ops))
        return True

    async def to_dict(self) -> dict[str, Any]:
        return dict(self._data.to_dict())


# ---------------------------------------------------------------- the adapter


class ToyAdapter(PullingAdapter[ToyMessage]):
    """Everything an adapter on a pull queue writes."""

    def __init__(self, *, queue: ToyQueue, states: dict[str, Context], **options: Any) -> None:
        super().__init__(**options)
        self.queue = queue
        self.states = states

    def create_context(self, run_id: str) -> ToyContext:
        return ToyContext(self.states.setdefault(run_id, Context()))

    async def enqueue_job(self, job: JobPayload) -> None:
        self.queue.put(job.encode())

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        self.queue.results.setdefault(run_id, result)  # the first publication wins

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        return self.queue.results.get(run_id)

    async def receive(self, max_messages: int) -> Sequence[ToyMessage]:
        for _ in range(20):  # a short poll
            found = self.queue.take(max_messages, self.visibility_seconds)
            if found:
                return found
            await asyncio.sleep(0.01)
        return []

    def message_body(self, message: ToyMessage) -> bytes:
        return message.body

    def delivery_count(self, message: ToyMessage) -> int:
        return message.deliveries

    async def ack(self, messages: Sequence[ToyMessage]) -> None:
        self.queue.calls["ack"] += 1
        for m in messages:
            if self.queue.owned(m) is not None:
                del self.queue.messages[m.id]

    async def renew(self, message: ToyMessage, seconds: float) -> None:
        self.queue.calls["renew"] += 1
        stored = self.queue.owned(message)
        if stored is not None:
            stored.visible_at = time.monotonic() + seconds

    async def release(self, message: ToyMessage, delay_seconds: float) -> None:
        self.queue.calls["release"] += 1
        stored = self.queue.owned(message)
        if stored is not None:
            stored.visible_at = time.monotonic() + delay_seconds

    async def dead_letter(self, message: ToyMessage, reason: str) -> None:
        if self.queue.owned(message) is not None:
            del self.queue.messages[message.id]
            self.queue.dead.append(DeadLetter(message.body.decode("latin-1"), reason))

    # For tools and the conformance kit:

    async def enqueue_raw(self, body: bytes) -> None:
        self.queue.put(body)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return self.queue.dead[:limit]


# ---------------------------------------------------------------- the kit


class TestToyAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        queue, states = ToyQueue(), dict[str, Context]()
        store = InMemoryCoordinationStore()

        def build(options: RuntimeOptions, **kw: Any) -> ToyAdapter:
            return ToyAdapter(
                runtime_options=options,
                coordination_store=store,
                queue=queue,
                states=states,
                **({"visibility_seconds": 2.0} | kw),
            )

        return build


class TestToyContext(ContextStoreTests):
    @pytest.fixture
    def context(self) -> ToyContext:
        return ToyContext(Context())


# ---------------------------------------------------------------- the loop's duties


def _worker(queue: ToyQueue, flow: Flow, **kw: Any) -> ToyAdapter:
    return ToyAdapter(
        runtime_options=RuntimeOptions.from_flows(flow),
        coordination_store=InMemoryCoordinationStore(),
        queue=queue,
        states={},
        **kw,
    )


async def _run(adapter: ToyAdapter, flow: Flow, runs: int) -> list[FinalResult]:
    worker = asyncio.ensure_future(adapter.worker())
    try:
        ids = [await adapter.start_run(flow.id) for _ in range(runs)]
        return [await adapter.wait_for_result(i, timeout=20) for i in ids]
    finally:
        await adapter.aclose()
        await worker


async def test_acks_go_out_in_batches() -> None:
    flow = Flow("fan").node("a", lambda ctx: 1)
    for i in range(8):
        flow.node(f"b{i}", lambda ctx: 2).edge("a", f"b{i}")
    queue = ToyQueue()
    adapter = _worker(queue, flow, concurrency=16, ack_batch_size=8, ack_batch_window=0.05)
    results = await _run(adapter, flow, 4)
    assert {r.status for r in results} == {"completed"}
    assert not queue.messages
    # 36 jobs; acks were sent together, not one call per job.
    assert queue.calls["ack"] < 36 / 2


async def test_a_long_job_is_renewed_not_redelivered() -> None:
    runs = 0

    async def slow(ctx: NodeContext) -> str:
        nonlocal runs
        runs += 1
        await asyncio.sleep(1.0)
        return "done"

    flow = Flow("slow").node("s", slow)
    queue = ToyQueue()
    adapter = _worker(queue, flow, visibility_seconds=0.3, lease_seconds=0.3)
    (result,) = await _run(adapter, flow, 1)
    assert result.status == "completed"
    assert runs == 1
    assert queue.calls["renew"] >= 2


async def test_undecodable_body_is_dead_lettered_with_the_reason() -> None:
    flow = Flow("one").node("a", lambda ctx: 1)
    queue = ToyQueue()
    queue.put(b"\xff not json")
    adapter = _worker(queue, flow)
    (result,) = await _run(adapter, flow, 1)
    assert result.status == "completed"
    assert [d.reason.split(":")[0] for d in queue.dead] == ["PayloadDecodeError"]


async def test_a_message_delivered_too_often_is_dead_lettered() -> None:
    flow = Flow("one").node("a", lambda ctx: 1)
    queue = ToyQueue()
    queue.put(JobPayload(run_id="r", blueprint_id="one", node_id="a").encode())
    queue.messages[1].deliveries = 5  # it crashed its workers five times
    adapter = _worker(queue, flow, max_deliveries=5)
    (result,) = await _run(adapter, flow, 1)
    assert result.status == "completed"
    assert len(queue.dead) == 1
    assert "delivered 6 times" in queue.dead[0].reason


async def test_stop_waits_out_a_short_poll_only() -> None:
    """A poll of the queue's own short length (the toy's: 0.2 s) is let finish, so
    nothing it took is left hidden; stop() still returns within it."""
    flow = Flow("one").node("a", lambda ctx: 1)
    adapter = _worker(ToyQueue(), flow)
    worker = asyncio.ensure_future(adapter.worker())
    await asyncio.sleep(0.05)
    started = time.monotonic()
    await adapter.aclose()
    await worker
    assert time.monotonic() - started < 1.0


async def test_a_cancelled_worker_settles_nothing() -> None:
    """Torn down mid-job (cancelled, not stopped): the job stops and its message stays
    on the queue, to come back once its invisibility runs out."""
    started = asyncio.Event()

    async def endless(ctx: NodeContext) -> None:
        started.set()
        await asyncio.sleep(3600)

    flow = Flow("endless").node("e", endless)
    queue = ToyQueue()
    adapter = _worker(queue, flow, visibility_seconds=60)
    await adapter.start_run("endless")
    worker = asyncio.ensure_future(adapter.worker())
    await asyncio.wait_for(started.wait(), 5)
    worker.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(worker, 5)
    assert len(queue.messages) == 1
    assert queue.calls["ack"] == 0


class _ResendingToyAdapter(ToyAdapter):
    """A queue that can put a fresh copy of a message (its count starting again)."""

    async def resend(self, message: ToyMessage, delay_seconds: float) -> bool:
        if self.queue.owned(message) is None:
            return True  # already gone: nothing to hand back
        del self.queue.messages[message.id]
        self.queue.put(message.body)
        self.queue.calls["resend"] = self.queue.calls.get("resend", 0) + 1
        return True


async def test_hand_backs_near_the_delivery_limit_are_resent_not_parked() -> None:
    """A worker lacking the job's version hands it back again and again; near
    ``max_deliveries`` the loop re-sends it instead of releasing it, so the job is
    never parked as a poison message and runs once a worker that has it comes."""
    old, new = Flow("v", version="1"), Flow("v", version="2")
    old.node("a", lambda ctx: "done")
    new.node("a", lambda ctx: "done")
    queue, store, states = ToyQueue(), InMemoryCoordinationStore(), dict[str, Context]()

    def build(flow: Flow) -> ToyAdapter:
        return _ResendingToyAdapter(
            runtime_options=RuntimeOptions.from_flows(flow),
            coordination_store=store,
            queue=queue,
            states=states,
            max_deliveries=4,
        )

    client, lacking = build(old), build(new)
    run_id = await client.start_run("v")
    worker = asyncio.ensure_future(lacking.worker())
    try:
        deadline = time.monotonic() + 10
        while queue.calls.get("resend", 0) < 3 and not queue.dead:
            assert time.monotonic() < deadline, "the lacking worker handed nothing back"
            await asyncio.sleep(0.02)
        assert queue.dead == []
    finally:
        await lacking.aclose()
        await worker
    assert queue.dead == []
    good = build(old)
    running = asyncio.ensure_future(good.worker())
    try:
        result = await client.wait_for_result(run_id, timeout=20)
    finally:
        await good.aclose()
        await running
        await client.aclose()
    assert result.status == "completed"
    assert queue.dead == []
