"""A worker's lifecycle (start, stop, close), the reconciler, and settlement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Self

from flowcraft.distributed import keys as K
from flowcraft.distributed._core import (
    JobHandler,
    _AdapterCore,
)
from flowcraft.distributed.delivery import (
    DeadLetter,
    Settlement,
    settlement_for,
)
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import (
    PayloadDecodeError,
)

logger = logging.getLogger("flowcraft.distributed")


class WorkerLifecycle(_AdapterCore):
    """The worker loop's lifecycle, the reconciler beside it and the settlement of
    each delivery."""

    async def worker(self) -> None:
        """Process jobs until ``stop()`` (what a worker process runs), with the
        reconciler beside it when ``reconcile_interval_seconds`` is set."""
        self._stopping.clear()
        self._idle.clear()
        reconciler = (
            asyncio.ensure_future(self._reconcile_until_stopped())
            if self.reconcile_interval_seconds
            else None
        )
        try:
            await self.process_jobs(self.handle_job)
        finally:
            # Background work ends on the flag, not by cancellation (which a client
            # call in flight could swallow).
            self._stopping.set()
            if reconciler is not None:
                await asyncio.gather(reconciler, return_exceptions=True)
            self._idle.set()

    async def stop(self) -> None:
        """Ask ``process_jobs`` to finish: no new jobs; jobs in hand complete."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def aclose(self) -> None:
        """Stop, let the jobs in hand finish, then close the adapter's clients."""
        await self.stop()
        await self._idle.wait()
        await self.close()
        if self._owned_store is not None:
            await self._owned_store.aclose()

    async def close(self) -> None:
        """Close what the adapter opened (clients, connections, listeners). Override;
        called once by :meth:`aclose` after the worker has stopped."""

    async def enqueue_raw(self, body: bytes) -> None:
        """Put ``body`` on the job queue as it is, unchecked (for tools and tests: the
        conformance kit sends garbage this way). Override."""
        raise NotImplementedError(f"{type(self).__name__} cannot put raw bytes on its queue")

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Jobs parked by ``dead-letter`` settlements, with their reasons (at most
        ``limit``, without removing them). Override."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its dead letters")

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Put up to ``limit`` parked jobs back on the job queue as they are, removing
        them from the dead letters; returns how many. Each is enqueued before it is
        removed: a crash between the two duplicates a job (which the protocol absorbs)
        but never loses one. Override where the queue allows it."""
        raise NotImplementedError(f"{type(self).__name__} cannot requeue its dead letters")

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Delete up to ``limit`` parked jobs (None: all of them); returns how many.
        Override where the queue allows it."""
        raise NotImplementedError(f"{type(self).__name__} cannot purge its dead letters")

    async def queue_depth(self) -> int | None:
        """Jobs waiting in the job queue (ready or delayed; not those in hand), where
        the queue can tell cheaply: for metrics. None: it cannot. Override."""
        return None

    async def active_runs(self, limit: int = 100) -> list[str]:
        """Runs that have not ended and do not wait for a resume, without changing
        anything (``flowcraft runs``). Override (the reconciler's index of active
        runs, read only); the base cannot list runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its active runs")

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """Runs not ended nor waiting for a resume whose state has not changed for
        ``older_than_seconds``: the reconciler's candidates. Override (an index of
        active runs in the adapter's store); the base cannot list runs."""
        raise NotImplementedError(f"{type(self).__name__} cannot list stalled runs")

    async def reconcile_stalled(
        self, older_than_seconds: float | None = None, *, limit: int = 1000
    ) -> dict[str, int]:
        """``reconcile`` every stalled run; returns the jobs enqueued per run."""
        age = self.stalled_after_seconds if older_than_seconds is None else older_than_seconds
        enqueued: dict[str, int] = {}
        for run_id in await self.find_stalled_runs(age, limit):
            try:
                enqueued[run_id] = await self.reconcile(run_id)
            except Exception as exc:
                self.logger.warning("reconciling run %s failed: %r", run_id, exc)
        if enqueued:
            self.logger.info("reconciled %d stalled runs", len(enqueued))
        return enqueued

    async def _reconcile_until_stopped(self) -> None:
        """Every ``reconcile_interval_seconds``, one worker of the fleet (the one that
        claims the interval) reconciles the stalled runs."""
        interval = float(self.reconcile_interval_seconds or 60.0)
        claim = K.reconciler(self.key_prefix)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            try:
                if await self.coordination_store.set_if_not_exist(
                    claim, self.worker_id, interval * 0.9
                ):
                    await self.reconcile_stalled()
            except Exception as exc:
                self.logger.warning("the reconciler failed (%r); trying again next period", exc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def settle(self, delivery: Any, handler: JobHandler | None = None) -> Settlement:
        """Decode a delivery (a ``JobPayload``, or the raw body: bytes, text or parsed
        JSON), run its job and decide what the queue does with it.

        Every adapter settles through here: a payload that does not decode is
        dead-lettered, and the handler's outcome maps to one :class:`Settlement`
        (see :func:`~flowcraft.distributed.delivery.settlement_for`)."""
        try:
            job = delivery if isinstance(delivery, JobPayload) else JobPayload.decode(delivery)
        except PayloadDecodeError as exc:
            return settlement_for(exc)
        try:
            await (handler or self.handle_job)(job)
        except Exception as exc:
            settlement = settlement_for(exc, infrastructure_delay=self.retry_delay_seconds)
            log = self.logger.warning if settlement.action == "dead-letter" else self.logger.debug
            log("job %s/%s: %s (%s)", job.run_id, job.node_id, settlement.action, settlement.reason)
            return settlement
        return Settlement.ack()
