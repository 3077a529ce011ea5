"""The event bus that writes history: batched, in the background, off the job path."""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Awaitable, Collection
from typing import TYPE_CHECKING

from flowcraft.events import EventBus, FlowEvent, emit
from flowcraft.history._records import HistoryEvent, HistoryStore, record_of

if TYPE_CHECKING:
    from flowcraft.distributed import BaseDistributedAdapter, JobPayload

__all__ = ["HistoryRecorder"]

logger = logging.getLogger("flowcraft.history")


class HistoryRecorder:
    """An event bus that records every event of every run in ``store``.

    ``emit`` only appends the event to a bounded in-memory queue (and forwards it to
    ``inner``): a background task writes the queue in batches of up to ``batch_size``
    when that many are waiting, ``flush_interval`` seconds after the first one, on
    :meth:`flush`, and on :meth:`aclose`. A failed write is tried again (with a
    growing pause); while the store is unreachable the queue fills up to
    ``max_pending`` events and then new events are dropped (counted in
    ``dropped``, logged): history never stops a workflow.

    Kinds in ``exclude`` are not recorded (say, ``{"job:enqueued"}`` on a busy
    fleet). On a fleet, :meth:`instrument` the adapter as well so a job is
    acknowledged only once its events are stored (see there).
    """

    def __init__(
        self,
        store: HistoryStore,
        *,
        inner: EventBus | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        max_pending: int = 100_000,
        exclude: Collection[str] = (),
        worker_id: str | None = None,
    ) -> None:
        if batch_size < 1 or max_pending < batch_size:
            raise ValueError("batch_size must be at least 1 and at most max_pending")
        self.store = store
        self.inner = inner
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.exclude = frozenset(exclude)
        self.worker_id = (
            worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}"
        )
        self.dropped = 0
        """Events not recorded because the queue was full."""
        self.written = 0
        """Events this recorder stored (a duplicate of a stored event counts too)."""
        self._pending: collections.deque[HistoryEvent] = collections.deque()
        self._accepted = 0  # events ever queued
        self._done = 0  # of those, written (or given up on)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------ the event bus

    def emit(self, event: FlowEvent) -> Awaitable[None] | None:
        """Queue the event for writing (never waits for the store)."""
        if event.type not in self.exclude and not self._closing:
            self._queue(record_of(event, self.worker_id))
        if self.inner is not None:
            return emit(self.inner, event)
        return None

    def _queue(self, record: HistoryEvent) -> None:
        if len(self._pending) >= self.max_pending:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                logger.error(
                    "history queue full (%d events): %d events dropped so far; is the "
                    "history store reachable?",
                    self.max_pending,
                    self.dropped,
                )
            return
        self._pending.append(record)
        self._accepted += 1
        if self._task is None:
            self._start()
        assert self._wake is not None
        if len(self._pending) >= self.batch_size:
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._wake.set)

    def _start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._writer(), name="flowcraft-history-writer"
        )

    # ------------------------------------------------------------ the writer

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            while self._pending:
                count = min(len(self._pending), self.batch_size)
                batch = [self._pending[i] for i in range(count)]
                await self._write(batch)
                for _ in range(count):
                    self._pending.popleft()
                self._done += count
                self._wake_waiters()
            if self._closing:
                return

    async def _write(self, batch: list[HistoryEvent]) -> None:
        """Write ``batch``, trying again until it is stored; after three failed tries
        event by event, giving up (logged) only on events the store refuses alone."""
        pause = 0.2
        for attempt in range(1, 4):
            try:
                await self.store.write(batch)
                self.written += len(batch)
                return
            except Exception as exc:
                logger.warning(
                    "history write of %d events failed (try %d): %r", len(batch), attempt, exc
                )
            await asyncio.sleep(pause)
            pause = min(pause * 3, 5.0)
        while True:
            refused = 0
            for event in batch:
                try:
                    await self.store.write([event])
                    self.written += 1
                except Exception as exc:
                    refused += 1
                    if refused == len(batch) and len(batch) > 1:
                        break  # every one failed: the store, not the events
                    logger.error(
                        "history: %s event of run %s not recorded: %r",
                        event.kind,
                        event.run_id,
                        exc,
                    )
            else:
                return
            await asyncio.sleep(5.0)  # the store is down: try the batch again

    def _wake_waiters(self) -> None:
        keep = []
        for target, future in self._waiters:
            if target <= self._done:
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((target, future))
        self._waiters = keep

    # ------------------------------------------------------------ control

    async def flush(self) -> None:
        """Return once every event emitted so far is stored (or given up on)."""
        target = self._accepted
        if self._done >= target:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        assert self._wake is not None
        self._wake.set()
        await future

    async def aclose(self) -> None:
        """Write what is queued and stop (the store stays open: it is the caller's)."""
        self._closing = True
        task = self._task
        if task is None or task.done():
            return
        assert self._wake is not None
        self._wake.set()
        await task

    async def __aenter__(self) -> HistoryRecorder:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def instrument(
        self, adapter: BaseDistributedAdapter, *, ack_timeout: float | None = 10.0
    ) -> None:
        """Acknowledge each of ``adapter``'s jobs only once the events it emitted are
        stored. Without this, a worker killed after a job was acknowledged loses that
        job's events still queued here, and nothing delivers the job again to emit them.
        The node itself never waits: only the acknowledgement does, for the next batch
        (up to ``ack_timeout`` seconds, then it acknowledges anyway, logged: history
        must not stop a fleet whose history store is down). A job handed back or
        failed is not waited for: its redelivery emits its events again."""
        handle = adapter.handle_job

        async def handle_job(job: JobPayload) -> None:
            await handle(job)
            try:
                async with asyncio.timeout(ack_timeout):
                    await self.flush()
            except TimeoutError:
                logger.warning(
                    "history: events of %s (run %s) not stored after %s s; acknowledging",
                    job.node_id,
                    job.run_id,
                    ack_timeout,
                )

        adapter.handle_job = handle_job  # type: ignore[method-assign]
