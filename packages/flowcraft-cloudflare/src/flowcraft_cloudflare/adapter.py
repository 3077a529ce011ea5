"""``CloudflareAdapter``: jobs on Cloudflare Queues, runs in Durable Objects.

The base class runs all orchestration; this module writes the primitives, each a
call to the companion Worker (``worker/worker.mjs``):

* ``create_context``: the run's ``FlowcraftRun`` object (context rows, coordination
  keys, the final result; see :mod:`flowcraft_cloudflare.context`).
* ``enqueue_job`` / ``enqueue_jobs``: one ``enqueue`` call (the Worker sends a batch
  to the Cloudflare Queue; its consumer files the messages in the inbox object).
* ``receive`` / ``renew`` / ``ack`` / ``release`` / ``dead_letter``: the inbox's
  pull, extend, ack, release and dead calls, shaped as the pull primitives of the
  core's coming ``PullingAdapter``. ``process_jobs`` is a small loop over them
  until that base class lands on main.
* ``publish_final_result``: insert-if-absent of the result in the run object, which
  wakes ``wait_for_result``'s long poll on that object (no KV read anywhere: KV
  caches a miss for about a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from flowcraft.blueprint import NodeDefinition
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
    RetryJob,
    job_disposition,
)
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.results import ResultWatch
from flowcraft.errors import NodeExecutionError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer
from flowcraft_cloudflare._client import WorkerClient, WorkerError, WorkerSettings
from flowcraft_cloudflare.context import MAX_VALUE_BYTES, DurableObjectContext, run_object
from flowcraft_cloudflare.coordination import DurableObjectCoordinationStore
from flowcraft_cloudflare.inbox import DeadLetter, Inbox, InboxMessage

__all__ = ["CloudflareAdapter"]

RetryMode = Literal["in-process", "queue"]
_WAIT_SECONDS = 20.0  # one long poll for a result; below the client's timeout


class CloudflareAdapter(BaseDistributedAdapter):
    """A flowcraft worker (and operator client) on Cloudflare, through the companion Worker.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        settings: where the Worker is and its shared secret (a client is made and owned),
            or ``client``: a shared :class:`WorkerClient`.
        queue_name: the inbox (logical queue) this worker consumes and sends to.
        namespace: keeps apps sharing one Worker apart (object names start with it).
        direct: send jobs straight into the inbox instead of through the Cloudflare Queue.
        retry_mode: ``"in-process"`` or ``"queue"`` (one attempt per delivery, the
            inbox's delivery count is the attempt number, backoff by visibility).
        concurrency: jobs in hand at once.
        visibility_timeout: seconds a pulled message stays hidden; renewed every third
            of it while its job runs.
        poll_seconds: how long one pull waits for a message (<= 25).
        retry_delay_seconds: delay of a hand-back that names none.
        max_backoff_seconds: ceiling of queue-mode backoff (and of any delay: 12 h).
        ack_batch_window: seconds to gather acks into one call.
        max_value_bytes: the largest key + value a run object row takes (2 MB).
        event_bus, key_prefix, state_ttl_seconds, lease_seconds,
            dedupe_window_seconds, worker_id: see ``BaseDistributedAdapter``.
    """

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        settings: WorkerSettings | None = None,
        client: WorkerClient | None = None,
        queue_name: str = "flowcraft-jobs",
        namespace: str = "flowcraft",
        direct: bool = False,
        retry_mode: RetryMode = "in-process",
        concurrency: int = 10,
        visibility_timeout: float = 30.0,
        poll_seconds: float = 2.0,
        retry_delay_seconds: float = 1.0,
        max_backoff_seconds: float = 900.0,
        ack_batch_window: float = 0.005,
        max_value_bytes: int = MAX_VALUE_BYTES,
        event_bus: EventBus | None = None,
        **options: Any,
    ) -> None:
        if (settings is None) == (client is None):
            raise ValueError("pass settings= or client=, exactly one")
        if retry_mode not in ("in-process", "queue"):
            raise ValueError(f"retry_mode must be 'in-process' or 'queue', not {retry_mode!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not 0 < visibility_timeout <= 12 * 3600:
            raise ValueError("visibility_timeout must be in (0, 43200] seconds")
        if not 0 <= poll_seconds <= 25:
            raise ValueError("poll_seconds must be 0..25")
        self._owns_client = client is None
        self.client = client if client is not None else WorkerClient(settings)  # type: ignore[arg-type]
        key_prefix = options.get("key_prefix", "flowcraft:")
        store = DurableObjectCoordinationStore(
            self.client, namespace=namespace, key_prefix=key_prefix
        )
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=store,
            event_bus=event_bus,
            **options,
        )
        self.namespace = namespace
        self.inbox = Inbox(self.client, queue_name, direct=direct)
        self.retry_mode: RetryMode = retry_mode
        self.concurrency = concurrency
        self.visibility_timeout = visibility_timeout
        self.poll_seconds = poll_seconds
        self.retry_delay_seconds = retry_delay_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.ack_batch_window = ack_batch_window
        self.max_value_bytes = max_value_bytes
        self.serializer = runtime_options.serializer or JsonSerializer()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_hand: dict[str, InboxMessage] = {}
        self._acks: list[InboxMessage] = []
        self._ack_flush: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.inbox.name!r}, worker_id={self.worker_id!r})"

    # ------------------------------------------------------------ the seed's primitives

    def create_context(self, run_id: str) -> DurableObjectContext:
        return DurableObjectContext(
            self.client,
            run_object(self.namespace, run_id),
            run_id,
            serializer=self.serializer,
            ttl_seconds=self.state_ttl_seconds,
            max_value_bytes=self.max_value_bytes,
        )

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.inbox.send([job.encode().decode()])

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """One call for the whole batch (the Worker sends 100 messages a ``sendBatch``)."""
        await self.inbox.send([job.encode().decode() for job in jobs])

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Insert-if-absent in the run object: the first result published stays."""
        stored = {"status": result.status, "errors": result.errors, "context": result.context}
        ctx = self.create_context(run_id)
        await ctx.batch([{"op": "result_put", "value": self.serializer.dumps(stored)}])

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The published result: one call to the run object."""
        ctx = self.create_context(run_id)
        (answer,) = await ctx.batch([{"op": "result_get"}])
        return self._result(run_id, answer.get("value"))

    def _result(self, run_id: str, text: str | None) -> FinalResult | None:
        if text is None:
            return None
        data = self.serializer.loads(text)
        return FinalResult(run_id, data["status"], data["context"], data.get("errors", []))

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        """A long poll on the run object, answered when the result is inserted there."""
        event = asyncio.Event()
        poll = asyncio.ensure_future(self._long_poll(run_id, event))
        try:
            yield ResultWatch(event)
        finally:
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)

    async def _long_poll(self, run_id: str, event: asyncio.Event) -> None:
        name = run_object(self.namespace, run_id)
        while True:
            try:
                answer = await self.client.call(
                    "wait", {"object": name, "timeout": _WAIT_SECONDS}, label="wait"
                )
            except WorkerError as exc:
                self.logger.debug("result long poll for %s failed: %s", run_id, exc)
                event.set()  # the waiter reads once, then polls with backoff
                await asyncio.sleep(1.0)
                continue
            if answer.get("value") is not None:
                event.set()
                return

    # ------------------------------------------------------------ queue-native retries

    def should_retry_in_process(self, node_def: NodeDefinition) -> bool:
        return self.retry_mode == "in-process"

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        if self.should_retry_in_process(node_def):
            return None
        config = node_def.config
        return {
            "maxAttempts": node_def.max_attempts,
            "retryDelayMs": config.retry_delay if config else 0,
            "backoff": config.retry_backoff if config else "exponential",
        }

    # ------------------------------------------------------------ pull primitives

    async def receive(self, max_messages: int) -> Sequence[InboxMessage]:
        """Up to ``max_messages``, waiting at most ``poll_seconds`` when none are ready."""
        return await self.inbox.pull(
            max_messages,
            visibility_seconds=self.visibility_timeout,
            wait_seconds=self.poll_seconds,
        )

    def message_body(self, message: InboxMessage) -> str:
        return message.body

    def delivery_count(self, message: InboxMessage) -> int | None:
        return message.attempts

    async def ack(self, messages: Sequence[InboxMessage]) -> None:
        await self.inbox.ack(messages)

    async def renew(self, message: InboxMessage, seconds: float) -> None:
        await self.inbox.extend([message], seconds)

    async def release(
        self, message: InboxMessage, delay_seconds: float, *, counted: bool = False
    ) -> None:
        await self.inbox.release([message], delay_seconds, counted=counted)

    async def dead_letter(self, message: InboxMessage, reason: str) -> None:
        await self.inbox.dead_letter(message, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The inbox's parked messages with their reasons."""
        return await self.inbox.dead_letters(limit)

    # ------------------------------------------------------------ the loop (until PullingAdapter)

    async def stop(self) -> None:
        await super().stop()
        self._wake.set()

    async def aclose(self) -> None:
        """Stop, let jobs in hand finish, and close the client if this adapter made it."""
        await self.stop()
        await self._idle.wait()
        if self._owns_client:
            await self.client.aclose()

    async def process_jobs(self, handler: JobHandler) -> None:
        self._wake.clear()
        self._idle.clear()
        tasks: set[asyncio.Task[None]] = set()
        slot = asyncio.Event()
        renewer = asyncio.ensure_future(self._renew_loop())

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slot.set()

        try:
            while not self.stopping:
                free = self.concurrency - len(tasks)
                if free <= 0:
                    slot.clear()
                    await _first(slot.wait(), self._wake.wait())
                    continue
                try:
                    # Not abandoned on stop(): messages it took would stay hidden for a
                    # visibility timeout. It waits poll_seconds at most.
                    messages = await self.receive(free)
                except WorkerError as exc:
                    self.logger.warning("pulling from %s failed: %s", self.inbox.name, exc)
                    await _first(asyncio.sleep(1.0), self._wake.wait())
                    continue
                if messages and self.stopping:
                    await self.inbox.release(messages, 0)
                    break
                for message in messages:
                    self._in_hand[message.id] = message
                    task = asyncio.ensure_future(self._deliver(handler, message))
                    tasks.add(task)
                    task.add_done_callback(finished)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            await self._flush_acks()
            self._idle.set()

    async def _deliver(self, handler: JobHandler, message: InboxMessage) -> None:
        job: JobPayload | None = None
        try:
            job = self._decode(message)
            await handler(job)
        except asyncio.CancelledError:
            self._in_hand.pop(message.id, None)
            raise
        except Exception as exc:
            self._in_hand.pop(message.id, None)
            try:
                await self._settle(message, job, exc)
            except Exception as settle_exc:
                self.logger.warning(
                    "message %s: could not settle after %r: %s; it comes back when its "
                    "visibility ends",
                    message.id,
                    exc,
                    settle_exc,
                )
            return
        self._in_hand.pop(message.id, None)
        self._acks.append(message)
        if self._ack_flush is None or self._ack_flush.done():
            self._ack_flush = asyncio.ensure_future(self._ack_later())

    async def _ack_later(self) -> None:
        await asyncio.sleep(self.ack_batch_window)
        await self._flush_acks()

    async def _flush_acks(self) -> None:
        while self._acks:
            batch, self._acks = self._acks[:100], self._acks[100:]
            try:
                await self.ack(batch)
            except WorkerError as exc:
                self.logger.warning("acking %d messages failed: %s", len(batch), exc)

    def _decode(self, message: InboxMessage) -> JobPayload:
        job = JobPayload.decode(message.body)
        if self.retry_mode != "queue":
            return job
        node = self.node_for(job)
        attempts = node.max_attempts if node is not None else 1
        return job.model_copy(
            update={"attempt": message.attempts, "is_last_attempt": message.attempts >= attempts}
        )

    async def _settle(self, message: InboxMessage, job: JobPayload | None, exc: Exception) -> None:
        if job_disposition(exc) == "dead-letter":
            self.logger.warning("dead-lettering message %s: %s", message.id, exc)
            await self.dead_letter(message, f"{type(exc).__name__}: {exc}")
            return
        failed_attempt = (
            self.retry_mode == "queue"
            and isinstance(exc, RetryJob)
            and isinstance(exc.__cause__, NodeExecutionError)
            and job is not None
        )
        if failed_attempt:
            assert job is not None
            delay = self._backoff(job, message.attempts)
        elif isinstance(exc, RetryJob):
            delay = exc.delay_seconds
        else:
            delay = self.retry_delay_seconds
        await self.release(message, min(delay, self.max_backoff_seconds), counted=failed_attempt)

    def _backoff(self, job: JobPayload, attempt: int) -> float:
        node = self.node_for(job)
        config = node.config if node is not None else None
        base = (config.retry_delay if config else 0) / 1000
        if (config.retry_backoff if config else "exponential") == "fixed":
            return base
        return float(min(base * 2 ** max(attempt - 1, 0), base * 64))

    async def _renew_loop(self) -> None:
        """Every third of the visibility timeout, renew every message in hand (one call)."""
        interval = self.visibility_timeout / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._in_hand.values())
            if not held:
                continue
            try:
                kept = await self.inbox.extend(held, self.visibility_timeout)
            except WorkerError as exc:
                self.logger.warning("renewing %d messages failed: %s", len(held), exc)
                continue
            lost = [m.id for m, ok in zip(held, kept, strict=True) if not ok]
            if lost:
                self.logger.info("lost the lease of %d message(s): %s", len(lost), lost[:5])


async def _first(*waits: Any) -> None:
    """Wait until the first of these awaitables finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
