"""``PullingAdapter``: one worker loop for every queue that is polled.

SQS, Pub/Sub, Azure Queues, Kafka and the Cloudflare inbox all hand out messages
on request and forget them unless they are acknowledged in time. The loop that
drives them is the same: ask for as many messages as there are free slots, keep
each one invisible while its job runs, settle it as the base adapter decides, and
acknowledge in batches. It lives here once; an adapter writes only the queue's
calls (:meth:`PullingAdapter.receive`, ``ack``, ``renew``, ``release``,
``dead_letter``, ``message_body``, ``delivery_count``).

A message's fate follows the base's :class:`~flowcraft.distributed.delivery.Settlement`:
``ack`` joins the next batch of acknowledgements (the job's task ends once it is
sent), ``release`` makes it deliverable again after the delay, ``dead-letter`` parks
it with the reason. A worker torn down mid-job settles nothing: the queue delivers
the message again once its invisibility runs out, which the protocol makes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from flowcraft.distributed.adapter import BaseDistributedAdapter, JobHandler
from flowcraft.distributed.delivery import Settlement

__all__ = ["PullingAdapter"]

logger = logging.getLogger("flowcraft.distributed.pull")

M = TypeVar("M")

_RECEIVE_ERROR_PAUSE = 1.0
_STOP_RECEIVE_GRACE = 2.0
_RESEND_MARGIN = 3
"""A message handed back this close to the queue's delivery limit is re-sent fresh."""


class PullingAdapter(BaseDistributedAdapter, Generic[M]):
    """Base for adapters on pull-based queues; ``M`` is the queue's message type.

    Args:
        concurrency: jobs in hand at once (messages are asked for per free slot).
        visibility_seconds: how long a received message stays invisible; renewed
            every third of it while its job runs.
        ack_batch_size / ack_batch_window: acknowledgements are sent in batches of
            up to this many, or after this many seconds, whichever comes first.
        max_deliveries: dead-letter a message the queue has delivered more often than
            this without its job being settled (a job that kills its worker); None:
            never (the queue's own redrive policy may still apply).
        **options: see :class:`BaseDistributedAdapter`.
    """

    def __init__(
        self,
        *,
        concurrency: int = 10,
        visibility_seconds: float = 30.0,
        ack_batch_size: int = 10,
        ack_batch_window: float = 0.02,
        max_deliveries: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if visibility_seconds <= 0:
            raise ValueError("visibility_seconds must be > 0")
        if ack_batch_size < 1:
            raise ValueError("ack_batch_size must be >= 1")
        self.concurrency = concurrency
        self.visibility_seconds = visibility_seconds
        self.ack_batch_size = ack_batch_size
        self.ack_batch_window = ack_batch_window
        self.max_deliveries = max_deliveries
        self._acks: _AckBatcher[M] | None = None

    # ------------------------------------------------------------ the queue's calls

    @abstractmethod
    async def receive(self, max_messages: int) -> Sequence[M]:
        """Up to ``max_messages`` messages, each invisible to other consumers for
        ``visibility_seconds``; waits at most a short poll when none is ready."""

    @abstractmethod
    def message_body(self, message: M) -> bytes | str:
        """The job payload as it was put on the queue."""

    def delivery_count(self, message: M) -> int | None:
        """How many times the queue has delivered ``message`` (None: it does not say)."""
        return None

    @abstractmethod
    async def ack(self, messages: Sequence[M]) -> None:
        """Remove handled messages for good."""

    @abstractmethod
    async def renew(self, message: M, seconds: float) -> None:
        """Keep ``message`` invisible ``seconds`` more: its job is still running."""

    @abstractmethod
    async def release(self, message: M, delay_seconds: float) -> None:
        """Make ``message`` deliverable again after ``delay_seconds``."""

    @abstractmethod
    async def dead_letter(self, message: M, reason: str) -> None:
        """Park ``message`` with ``reason`` and remove it from the queue."""

    async def redelivery_limit(self) -> int | None:
        """Deliveries after which the queue parks a message on its own (SQS's
        ``maxReceiveCount``, Pub/Sub's ``max_delivery_attempts``); by default
        ``max_deliveries``. Hand-backs count there too, so near it the loop re-sends."""
        return self.max_deliveries

    async def resend(self, message: M, delay_seconds: float) -> bool:
        """Put a fresh copy of ``message`` (its delivery count starting again), due
        after ``delay_seconds`` where the queue can delay, then remove ``message``.
        False: this queue cannot, and the message is released as it is."""
        return False

    # ------------------------------------------------------------ the loop

    async def process_jobs(self, handler: JobHandler) -> None:
        """Receive and run jobs until :meth:`stop`; the jobs in hand finish first."""
        acks = self._acks = _AckBatcher(self)
        tasks: set[asyncio.Task[None]] = set()
        slot_free = asyncio.Event()
        stopping = asyncio.ensure_future(self._stopping.wait())

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slot_free.set()

        try:
            while not self.stopping:
                free = self.concurrency - len(tasks)
                if free <= 0:
                    slot_free.clear()
                    await asyncio.wait(
                        {stopping, asyncio.ensure_future(slot_free.wait())},
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    continue
                try:
                    messages = await self._receive_unless_stopped(free, stopping)
                except Exception as exc:
                    logger.warning("receiving jobs failed: %r", exc)
                    await asyncio.wait({stopping}, timeout=_RECEIVE_ERROR_PAUSE)
                    continue
                for message in messages:
                    task = asyncio.ensure_future(self._deliver(handler, message))
                    tasks.add(task)
                    task.add_done_callback(finished)
        except asyncio.CancelledError:
            # Torn down, not stopped: the jobs in hand stop too and settle nothing (their
            # messages come back once their invisibility runs out).
            for task in tasks:
                task.cancel()
            raise
        finally:
            stopping.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await acks.flush()

    async def _receive_unless_stopped(
        self, free: int, stopping: asyncio.Future[Any]
    ) -> Sequence[M]:
        """One receive; abandoned if ``stop()`` comes first (what it then returns goes
        straight back to the queue)."""
        receiving = asyncio.ensure_future(self.receive(free))
        await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not receiving.done():
            # A short poll is let finish (what the server handed out meanwhile goes back
            # at once); a long one is cancelled, and its receive hands back what it took.
            await asyncio.wait({receiving}, timeout=_STOP_RECEIVE_GRACE)
            if not receiving.done():
                receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                late = await receiving
                await self._release_all(late)
            return ()
        messages = receiving.result()
        if len(messages) > free:
            raise RuntimeError(f"receive({free}) returned {len(messages)} messages")
        if self.stopping:
            await self._release_all(messages)
            return ()
        return messages

    async def _release_all(self, messages: Sequence[M]) -> None:
        for message in messages:
            try:
                await self.release(message, 0.0)
            except Exception as exc:
                logger.warning("could not release a message while stopping: %r", exc)

    async def _deliver(self, handler: JobHandler, message: M) -> None:
        count = self.delivery_count(message)
        if self.max_deliveries is not None and count is not None and count > self.max_deliveries:
            settlement = Settlement(
                "dead-letter",
                reason=f"delivered {count} times without being settled (limit "
                f"{self.max_deliveries}): its job may crash the worker",
            )
        else:
            renewer = _Renewer(self, message)
            try:
                settlement = await self.settle(self.message_body(message), handler)
            finally:
                await renewer.stop()
        try:
            if settlement.action == "ack":
                assert self._acks is not None
                await self._acks.ack(message)
            elif settlement.action == "release":
                await self._hand_back(message, count, settlement.delay_seconds)
            else:
                logger.warning("dead-lettering a job: %s", settlement.reason)
                await self.dead_letter(message, settlement.reason)
        except Exception as exc:
            # The queue delivers it again once its invisibility runs out.
            logger.warning("could not %s a message: %r", settlement.action, exc)

    async def _hand_back(self, message: M, count: int | None, delay_seconds: float) -> None:
        """Release a settled job; near the queue's own delivery limit, re-send it
        instead: a busy lease or a version this worker lacks must never get a healthy
        job parked, however often it comes back."""
        if count is not None:
            limit = await self.redelivery_limit()
            if (
                limit is not None
                and count >= limit - _RESEND_MARGIN
                and await self.resend(message, delay_seconds)
            ):
                return
        await self.release(message, delay_seconds)


class _Renewer:
    """Renews one message's invisibility every third of it while its job runs; never
    overlaps the message's settlement (some queues hand out a new receipt per call)."""

    __slots__ = ("_adapter", "_message", "_running", "_stopped", "_timer")

    def __init__(self, adapter: PullingAdapter[Any], message: Any) -> None:
        self._adapter = adapter
        self._message = message
        self._running: asyncio.Future[None] | None = None
        self._stopped = False
        self._timer = asyncio.get_running_loop().call_later(self._interval(), self._fire)

    def _interval(self) -> float:
        return self._adapter.visibility_seconds / 3

    def _fire(self) -> None:
        self._running = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        try:
            await self._adapter.renew(self._message, self._adapter.visibility_seconds)
        except Exception as exc:
            logger.warning("renewing a message's invisibility failed: %r", exc)
        if not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self._interval(), self._fire)

    async def stop(self) -> None:
        self._stopped = True
        self._timer.cancel()
        running = self._running
        if running is not None and not running.done():
            # Let a renewal in flight finish: its reply may carry the receipt that the
            # settlement must use.
            with contextlib.suppress(Exception):
                await asyncio.shield(running)


class _AckBatcher(Generic[M]):
    """Acknowledges messages in batches; each caller returns once its batch is sent."""

    def __init__(self, adapter: PullingAdapter[M]) -> None:
        self._adapter = adapter
        self._pending: list[tuple[M, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def ack(self, message: M) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((message, done))
        if len(self._pending) >= self._adapter.ack_batch_size:
            self._send_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._adapter.ack_batch_window, self._send_now)
        await done

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        size = self._adapter.ack_batch_size
        while self._pending:
            batch, self._pending = self._pending[:size], self._pending[size:]
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[M, asyncio.Future[None]]]) -> None:
        try:
            await self._adapter.ack([message for message, _ in batch])
        except Exception as exc:
            logger.warning(
                "acknowledging %d messages failed (%r): they will be delivered again",
                len(batch),
                exc,
            )
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def flush(self) -> None:
        self._send_now()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
