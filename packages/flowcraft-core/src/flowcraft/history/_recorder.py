"""The event bus that writes history: batched, in the background, off the job path."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Collection
from pathlib import Path
from typing import TYPE_CHECKING

from flowcraft.events import EventBus, FlowEvent, emit, ignored_kinds
from flowcraft.history._records import HistoryEvent, HistoryStore, record_of
from flowcraft.history._spool import Spool, SpoolFull, orphans, spool_files
from flowcraft.history._spool import read as read_spool

if TYPE_CHECKING:
    from flowcraft.distributed import BaseDistributedAdapter, JobPayload

__all__ = ["HistoryRecorder"]

logger = logging.getLogger("flowcraft.history")

_PILED_UP = 64
"""Spool files waiting in a spool-only recorder's folder past which it warns."""

_SPOOL_BYTES = 1 << 20
"""A spool file's size: once full, it is set aside for a new one, and deleted once
every event in it is stored."""


class HistoryRecorder:
    """An event bus that records every event of every run in ``store``.

    ``emit`` only appends the event to a bounded in-memory queue (and forwards it to
    ``inner``): a background task writes the queue in batches of up to ``batch_size``
    when that many are waiting, ``flush_interval`` seconds after the first one, on
    :meth:`flush`, and on :meth:`aclose`. A failed write is tried again (with a
    growing pause); while the store is unreachable the queue fills up to
    ``max_pending`` events and then new events are dropped (counted in
    ``dropped``, logged): history never stops a workflow. A :meth:`flush` is served
    ``linger`` seconds later, with whatever else was emitted meanwhile. Events
    emitted while a batch is being written wait for their own batch (or the timer):
    under a steady stream, writing on until the queue is empty would store a few
    events per transaction, at many times the cost per event.

    Kinds in ``exclude`` are not recorded: by default ``job:enqueued`` and
    ``job:processed``, a queue's plumbing that ``node:start``/``node:finish`` already
    tell (half of a fleet's events; ``exclude=()`` keeps them).

    On a fleet, a worker killed with events still queued would lose them, and a job
    it had acknowledged is never delivered again to emit them anew. Either give a
    ``spool`` folder on the worker's machine: each event is appended to this
    process's file there as it is emitted (copied into the file, mapped in memory;
    no waiting for the store), and a recorder finding the file of a process that
    died stores its events (at start, every ``recover_interval`` seconds, and on
    close), so a worker killed and restarted, or any other worker on that machine,
    recovers them; or :meth:`instrument` the adapter, so a job is acknowledged only
    once its events are stored (that also survives losing the machine, but holds
    each job's slot until the next batch is written).

    With ``store=None`` (and a ``spool``) the recorder only appends each event to its
    spool file: a :class:`SpoolDrainer` on that folder (``flowcraft history drain``,
    or the one ``flowcraft worker --history-drainer`` starts) stores them. The
    store's work then costs the worker nothing; :meth:`flush` returns at once (what
    was emitted is in the file) and :meth:`instrument` is refused.
    """

    def __init__(
        self,
        store: HistoryStore | None,
        *,
        inner: EventBus | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        linger: float = 0.02,
        max_pending: int = 100_000,
        exclude: Collection[str] = ("job:enqueued", "job:processed"),
        worker_id: str | None = None,
        spool: str | Path | None = None,
        recover_interval: float = 5.0,
    ) -> None:
        if batch_size < 1 or max_pending < batch_size:
            raise ValueError("batch_size must be at least 1 and at most max_pending")
        if store is None and spool is None:
            raise ValueError("a recorder without a store needs a spool (its drainer stores it)")
        self.store = store
        self.inner = inner
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.linger = linger
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
        self._writing = 0  # events at the head of _pending being written now
        self._accepted = 0  # events ever queued
        self._done = 0  # of those, written (or given up on)
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.spool_folder = Path(spool) if spool is not None else None
        self.recover_interval = recover_interval
        self.recovered = 0
        """Events this recorder stored from the spool files of processes that died."""
        self._spool: Spool | None = None
        # Full spool files set aside: (events accepted when it was, the file). Each
        # goes once that many events are stored.
        self._retired: list[tuple[int, Spool]] = []
        self._recovery: asyncio.Task[None] | None = None
        self._warned_at = -60.0

    # ------------------------------------------------------------ the event bus

    @property
    def ignored_kinds(self) -> frozenset[str]:
        """Kinds this bus does nothing with (see :func:`flowcraft.events.wants`): the
        excluded ones, unless ``inner`` takes them."""
        if self.inner is None:
            return self.exclude
        return self.exclude.intersection(ignored_kinds(self.inner))

    def emit(self, event: FlowEvent) -> Awaitable[None] | None:
        """Queue the event for writing (never waits for the store)."""
        if event.type not in self.exclude and not self._closing:
            if self.store is None:
                spool = self._spool
                if spool is None:
                    self._spool_only(event)  # the first event makes the file
                else:
                    try:
                        spool.append_event(event, self.worker_id)
                    except (SpoolFull, OSError):
                        self._spool_only(event)  # a new file, or the failure said
            else:
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
        if self._task is None:
            self._start()
        if self._spool is not None:
            try:
                try:
                    self._spool.append(record)
                except SpoolFull as full:
                    self._next_spool(full.needed, record)
            except OSError as exc:  # a full disk: the event still goes to the store
                logger.warning("history spool: %r", exc)
        self._pending.append(record)
        self._accepted += 1
        assert self._wake is not None
        if len(self._pending) - self._writing >= self.batch_size:
            self._wake.set()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self._wake.set)

    def _spool_only(self, event: FlowEvent) -> None:
        """No store here: the event goes to the spool file only, where the drainer
        finds it. A full file is let go of (its lock released), for the drainer to
        read to its end and delete."""
        folder = self.spool_folder
        assert folder is not None
        try:
            spool = self._spool
            if spool is None:
                spool = self._spool = Spool(folder, _SPOOL_BYTES)
            try:
                spool.append_event(event, self.worker_id)
            except SpoolFull as full:
                # Room to spare: the line is made again, with a new time (its repr
                # may be longer).
                made = Spool(folder, max(_SPOOL_BYTES, full.needed + 64))
                spool.close(remove=False)
                self._spool = made
                made.append_event(event, self.worker_id)
                self._check_drained(folder)
        except OSError as exc:  # a full disk: history never stops a workflow
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 10_000 == 0:
                logger.error("history spool: %r; %d events dropped so far", exc, self.dropped)

    def _check_drained(self, folder: Path) -> None:
        """Files piling up in the folder: nothing drains it (said at most once a
        minute; the worker goes on, the disk fills)."""
        now = time.monotonic()
        if now - self._warned_at < 60:
            return
        waiting = len(spool_files(folder))
        if waiting > _PILED_UP:
            self._warned_at = now
            logger.warning(
                "history spool %s holds %d files waiting to be stored: is `flowcraft "
                "history drain` running on it?",
                folder,
                waiting,
            )

    def _start(self) -> None:
        if self.store is None:
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._writer(), name="flowcraft-history-writer")
        if self.spool_folder is not None:
            self._spool = Spool(self.spool_folder, _SPOOL_BYTES)
            self._recovery = loop.create_task(self._recover_loop(), name="flowcraft-history-spool")

    async def start(self) -> None:
        """Start now (else the first event starts the recorder): with a ``spool``,
        this recovers what processes that died left there at once."""
        if self._task is None:
            self._start()
        if self.store is None and self._spool is None and self.spool_folder is not None:
            self._spool = Spool(self.spool_folder, _SPOOL_BYTES)

    # ------------------------------------------------------------ the spool

    async def _recover_loop(self) -> None:
        while True:
            await self.recover()
            await asyncio.sleep(self.recover_interval)

    async def recover(self) -> int:
        """Store the events in spool files whose process died, then delete the files.
        Returns how many (0 without a spool). Repeating an event is harmless: the
        store keeps the first."""
        folder = self.spool_folder
        if folder is None:
            return 0
        store = self.store
        if store is None:
            return 0  # the drainer's work
        own = {s.path for _, s in self._retired}
        if self._spool is not None:
            own.add(self._spool.path)
        total = 0
        for path in await asyncio.to_thread(orphans, folder, own):
            events = await asyncio.to_thread(read_spool, path)
            try:
                for i in range(0, len(events), self.batch_size):
                    await store.write(events[i : i + self.batch_size])
            except Exception as exc:
                logger.warning("history: spool %s not recovered yet: %r", path.name, exc)
                continue
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(path.unlink)
            total += len(events)
            logger.info("history: %d events recovered from %s", len(events), path.name)
        self.recovered += total
        return total

    # ------------------------------------------------------------ the writer

    async def _writer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._waiters and len(self._pending) < self.batch_size and not self._closing:
                # Someone waits (a job's acknowledgement): let the events of the jobs
                # finishing meanwhile join this batch. One write per job would cost
                # more than the job itself.
                await asyncio.sleep(self.linger)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            # What is queued now (all of it when closing): what comes meanwhile waits
            # for a batch of its own or the timer.
            pending = self._pending
            left = len(pending)
            while left or (self._closing and pending):
                count = min(left or len(pending), self.batch_size)
                batch = list(itertools.islice(pending, count))
                self._writing = count
                stored = await self._write(batch)
                self._writing = 0
                if not stored:
                    return  # closing with the store down: the spool keeps them
                for _ in range(count):
                    pending.popleft()
                left = max(0, left - count)
                self._done += count
                self._wake_waiters()
            if self._retired:
                self._tidy_spool()
            if self._closing:
                return

    def _next_spool(self, needed: int, record: HistoryEvent) -> None:
        """The spool file is full: set it aside (it goes once all its events are
        stored) and append ``record`` to a new one."""
        assert self._spool is not None
        assert self.spool_folder is not None
        made = Spool(self.spool_folder, max(_SPOOL_BYTES, needed))  # OSError: as before
        self._retired.append((self._accepted, self._spool))
        self._spool = made
        made.append(record)

    def _tidy_spool(self) -> None:
        """Delete the spool files set aside whose events are all stored."""
        while self._retired and self._retired[0][0] <= self._done:
            self._retired.pop(0)[1].close(remove=True)

    async def _write(self, batch: list[HistoryEvent]) -> bool:
        """Write ``batch``, trying again until it is stored; after three failed tries
        event by event, giving up (logged) only on events the store refuses alone.
        False: closing while the store is down (nothing more is tried)."""
        store = self.store
        assert store is not None
        pause = 0.2
        for attempt in range(1, 4):
            try:
                await store.write(batch)
                self.written += len(batch)
                return True
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
                    await store.write([event])
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
                return True
            if self._closing:
                logger.error(
                    "history store down at close: %d events not stored%s",
                    len(self._pending),
                    " (kept in the spool)" if self._spool is not None else "",
                )
                return False
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
        """Write what is queued and stop (the store stays open: it is the caller's).
        With a spool: this process's file goes, and orphaned ones are recovered."""
        self._closing = True
        if self.store is None:
            if self._spool is not None:  # every event is in it: the drainer takes it
                self._spool.close(remove=self._spool.size == 0)
                self._spool = None
            return
        task = self._task
        if task is None or task.done():
            return
        assert self._wake is not None
        self._wake.set()
        await task
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._spool is not None:
            # Kept if some events could not be stored: the next recorder takes them.
            for accepted, old in self._retired:
                old.close(remove=accepted <= self._done)
            self._retired = []
            self._spool.close(remove=self._done == self._accepted)
            self._spool = None
            await self.recover()

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
        if self.store is None:
            raise ValueError("a recorder without a store cannot wait for its events to be stored")
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
