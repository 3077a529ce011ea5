"""The in-memory adapter: a whole fleet in one process, for tests and simulation.

``InMemoryBroker`` plays the queue, the context store and the result store;
several ``InMemoryAdapter`` workers can share one broker. Delivery is at least
once, and deliberately so: the broker can duplicate jobs and redelivers any job
whose handler did not finish (as a queue does after a worker dies).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowcraft.context import (
    BaseAsyncContext,
    Context,
    Guard,
    PatchOperation,
    check_guard,
    guard_holds,
)
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
    RetryMode,
)
from flowcraft.distributed.coordination import CoordinationStore, InMemoryCoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import SerializationError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import MAX_DEPTH

__all__ = ["InMemoryAdapter", "InMemoryBroker", "InMemoryRunContext"]

logger = logging.getLogger("flowcraft.distributed.memory")

FaultHook = Callable[[str, str], Awaitable[None]]


class InMemoryRunContext(BaseAsyncContext):
    """One run's state in the broker. Counts operations; ``fault`` may raise before any."""

    def __init__(self, broker: InMemoryBroker, run_id: str) -> None:
        self._broker = broker
        self._run_id = run_id
        self._data: Context = broker.contexts.setdefault(run_id, Context())

    async def _op(self, name: str) -> None:
        self._broker.context_ops[name] += 1
        if self._broker.fault is not None:
            await self._broker.fault(f"context.{name}", self._run_id)

    async def get(self, key: str) -> Any:
        await self._op("get")
        return _copy(self._data.data.get(key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        await self._op("get_many")
        data = self._data.data
        found: dict[str, Any] = {k: _copy(data[k]) for k in keys if k in data}
        return found

    async def has(self, key: str) -> bool:
        await self._op("has")
        return key in self._data.data

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        check_guard(guard)
        await self._op("patch")
        self._broker.patch_sizes.append(len(ops))
        # Check and write with no await between them: one atomic step on the loop.
        applied = not guard or guard_holds(self._data.data, guard)
        if applied:
            self._data.apply([PatchOperation(o.op, o.key, _copy(o.value, o.key)) for o in ops])
        if self._broker.after_fault is not None:
            await self._broker.after_fault("context.patch", self._run_id)
        return applied

    async def to_dict(self) -> dict[str, Any]:
        await self._op("to_dict")
        copied: dict[str, Any] = _copy(self._data.to_dict())
        return copied


def _copy(value: Any, key: str | None = None) -> Any:
    """Values cross a store boundary as JSON would: no shared mutable objects.

    Iterative. A value written under ``key`` that nests deeper than ``MAX_DEPTH`` is
    refused as every store refuses it (a ``SerializationError`` naming the key, which
    fails the node), not a RecursionError; reads copy whatever was stored."""
    if not isinstance(value, dict | list):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        if depth > MAX_DEPTH and key is not None:
            raise SerializationError(
                f"context key {key!r}: cannot store the value: it nests deeper than "
                f"{MAX_DEPTH} levels of lists and dicts (flowcraft.serializer.MAX_DEPTH)"
            )
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for name, item in pairs:
            if isinstance(item, dict | list):
                child: Any = {} if isinstance(item, dict) else []
                stack.append((item, child, depth + 1))
                item = child
            if isinstance(target, dict):
                target[name] = item
            else:
                target.append(item)
    return root


@dataclass
class _Delivery:
    job: JobPayload
    deliveries: int = 0


@dataclass
class InMemoryBroker:
    """Queue + stores shared by in-memory workers.

    ``duplicate_rate``: chance an enqueued job is enqueued twice. ``fault``: an
    async hook awaited before each store operation; raise from it to simulate a
    worker dying there (the job is then redelivered).
    """

    store: InMemoryCoordinationStore = field(default_factory=InMemoryCoordinationStore)
    duplicate_rate: float = 0.0
    seed: int = 0
    max_redelivery_delay: float = 0.05
    fault: FaultHook | None = None
    after_fault: FaultHook | None = None
    """Awaited after a context ``patch`` took effect: raise from it (or sleep) to
    simulate a reply lost or delivered late."""
    queue: asyncio.Queue[_Delivery] = field(default_factory=asyncio.Queue)
    contexts: dict[str, Context] = field(default_factory=dict)
    results: dict[str, list[FinalResult]] = field(default_factory=dict)
    """Every ``publish_final_result`` call, per run (repeats after crashes included)."""
    published: dict[str, FinalResult] = field(default_factory=dict)
    """The published result per run: the first one (what ``wait_for_result`` returns)."""
    dead_letters: list[tuple[Any, str]] = field(default_factory=list)
    context_ops: Counter[str] = field(default_factory=Counter)
    patch_sizes: list[int] = field(default_factory=list)
    enqueued: int = 0
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self.idle = asyncio.Event()
        self.idle.set()

    def put(self, job: JobPayload) -> None:
        copies = 2 if self.duplicate_rate and self.random.random() < self.duplicate_rate else 1
        for _ in range(copies):
            self._put(_Delivery(job))
        self.enqueued += copies

    def _put(self, delivery: _Delivery) -> None:
        self.in_flight += 1
        self.idle.clear()
        self.queue.put_nowait(delivery)

    def put_raw(self, raw: Any) -> None:
        """Enqueue undecodable bytes (to test bad input)."""
        self.in_flight += 1
        self.idle.clear()
        self.queue.put_nowait(_Delivery(raw))

    def done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()

    def reset_counts(self) -> None:
        self.context_ops.clear()
        self.patch_sizes.clear()
        self.store.reset_counts()


class InMemoryAdapter(BaseDistributedAdapter):
    """A worker on an ``InMemoryBroker``. ``concurrency`` jobs at once."""

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        broker: InMemoryBroker | None = None,
        coordination_store: CoordinationStore | None = None,
        event_bus: EventBus | None = None,
        concurrency: int = 8,
        retry_mode: RetryMode = "in-process",
        **options: Any,
    ) -> None:
        self.broker = broker or InMemoryBroker()
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=coordination_store or self.broker.store,
            event_bus=event_bus,
            retry_mode=retry_mode,
            **options,
        )
        self.concurrency = concurrency

    def create_context(self, run_id: str) -> InMemoryRunContext:
        return InMemoryRunContext(self.broker, run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        self.broker.put(job)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        self.broker.results.setdefault(run_id, []).append(result)
        self.broker.published.setdefault(run_id, result)

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The published result (the first publication), once there is one."""
        return self.broker.published.get(run_id)

    async def process_jobs(self, handler: JobHandler) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        while not self.stopping:
            try:
                delivery = await asyncio.wait_for(self.broker.queue.get(), 0.05)
            except TimeoutError:
                continue
            await slots.acquire()
            task = asyncio.ensure_future(self._deliver(handler, delivery, slots))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver(
        self, handler: JobHandler, delivery: _Delivery, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self.deliver(handler, delivery)
        finally:
            slots.release()

    async def deliver(self, handler: JobHandler, delivery: _Delivery) -> None:
        """Hand one delivery to the base's settlement and carry it out, as a queue would."""
        delivery.deliveries += 1
        try:
            settlement = await self.settle(delivery.job, handler)
        except BaseException:
            # The worker died mid-job (cancelled, or a simulated crash that no handler
            # may catch): the queue redelivers the job, which is still in flight.
            self.broker.queue.put_nowait(delivery)
            raise
        if settlement.action == "release":
            # Never at once, which would spin a job between a worker that cannot take
            # it (another version, a busy activation) and the queue.
            # A timer's delay is kept (it is the time left, not a back-off to shorten).
            delay = (
                settlement.delay_seconds
                if settlement.timer
                else min(settlement.delay_seconds, self.broker.max_redelivery_delay)
            )
            asyncio.get_running_loop().call_later(delay, self.broker.queue.put_nowait, delivery)
            return
        if settlement.action == "dead-letter":
            logger.warning("dead-lettering job %r: %s", delivery.job, settlement.reason)
            self.broker.dead_letters.append((delivery.job, settlement.reason))
        self.broker.done()

    async def run_until_idle(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Process jobs until the broker has nothing in flight (a drain mode for tests)."""
        worker = asyncio.ensure_future(self.worker())
        try:
            await asyncio.sleep(0)
            async with asyncio.timeout(timeout):
                await self.broker.idle.wait()
        finally:
            await self.stop()
            await worker
