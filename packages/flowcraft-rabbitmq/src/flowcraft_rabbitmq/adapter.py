"""``RabbitMQAdapter``: flowcraft jobs on RabbitMQ, run state in PostgreSQL, Redis coordination.

The base class (``flowcraft.distributed.adapter.BaseDistributedAdapter``) owns all
orchestration. This module writes its primitives:

* ``enqueue_job``: a persistent message on the durable work queue, confirmed
  by the broker (publisher confirms); in ``retry_mode="queue"`` it carries the
  node's retry policy (attempts, backoff) in headers.
* ``process_jobs``: consume with ``prefetch = concurrency``; ack only after the
  handler returned (the job's effects are committed by then). On an exception
  ``job_disposition`` decides: ``retry`` publishes the message again through the
  delay queue of the wanted delay (per-message TTL, dead-lettered back to the
  work queue), then acks the original; ``dead-letter`` publishes it, with the
  error, to the dead-letter exchange, then acks. Undecodable bodies are
  dead-lettered. A message retried ``max_redeliveries`` times is dead-lettered
  as exhausted.
* ``create_context``: :class:`~flowcraft_rabbitmq.context.PostgresContext`.
* ``publish_final_result``: the run row's ``result`` column, written once;
  ``get_final_result`` (and so ``wait_for_result``) reads it in one query.

Attempts in ``retry_mode="queue"``: a classic queue keeps no delivery count, so
the adapter carries it in the ``x-flowcraft-attempt`` header of the message it
sends through the delay queue after a failed attempt. A redelivery after a
worker died does not use up an attempt (the node never reported a failure);
the lease and the activation's resolved count make it safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator, Mapping
from ssl import SSLContext
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from flowcraft.blueprint import NodeDefinition
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
    RetryJob,
    job_disposition,
)
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.redis import RedisCoordinationStore
from flowcraft.distributed.results import ResultWatch
from flowcraft.errors import NodeExecutionError, PayloadDecodeError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft_rabbitmq._broker import Broker, DeadLetter
from flowcraft_rabbitmq._settings import (
    HEADER_ATTEMPT,
    HEADER_BACKOFF,
    HEADER_BACKOFF_MS,
    HEADER_ERROR,
    HEADER_MAX_ATTEMPTS,
    HEADER_RETRIES,
    RetryMode,
    Topology,
    backoff_ms,
    delay_bucket_ms,
)
from flowcraft_rabbitmq._store import PostgresRunStore
from flowcraft_rabbitmq.context import PostgresContext

__all__ = ["RabbitMQAdapter"]

logger = logging.getLogger("flowcraft_rabbitmq")

_FINAL = frozenset({"completed", "failed", "cancelled"})
_MAX_ERROR_CHARS = 2000


def _int_header(headers: Mapping[str, Any], name: str, default: int) -> int:
    value = headers.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return default


def _own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's headers of a message (dropping x-death and the last error)."""
    return {k: v for k, v in headers.items() if k.startswith("x-flowcraft-") and k != HEADER_ERROR}


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class RabbitMQAdapter(BaseDistributedAdapter):
    """A flowcraft worker (and client) on RabbitMQ, PostgreSQL and Redis.

    Args:
        runtime_options: blueprints, registry and the rest of the runtime's setup.
        amqp_url: ``amqp://`` or ``amqps://`` URL of RabbitMQ (or ``amqp_connection``).
        amqp_connection: a robust aio-pika connection to share (not closed by ``aclose``).
        amqp_ssl_context: TLS for ``amqp_url``.
        amqp_options: more ``aio_pika.connect_robust`` options.
        postgres_dsn: ``postgresql://`` URL (or ``postgres_pool``).
        postgres_pool: an asyncpg pool to share (not closed by ``aclose``).
        postgres_options: ``asyncpg.create_pool`` options for ``postgres_dsn``
            (``ssl`` for TLS, ``max_size``, ...; ``max_size`` defaults to
            ``concurrency + 2``).
        redis_url: ``redis://`` or ``rediss://`` URL for the coordination store (or
            ``coordination_store``).
        redis_options: ``RedisCoordinationStore`` client options for ``redis_url``
            (TLS options such as ``ssl_ca_certs``, ``password``, ...).
        coordination_store: any :class:`CoordinationStore` (not closed by ``aclose``).
        queue_name: the work queue; the delay queues, the dead-letter exchange and
            queue are named after it.
        table: the PostgreSQL runs table; ``schema`` its schema.
        concurrency: jobs one worker handles at once (the consumer's prefetch).
        retry_mode: ``"in-process"`` (the worker retries a failing node) or
            ``"queue"`` (one attempt per delivery; RabbitMQ redelivers after the
            node's backoff through a delay queue).
        retry_delay_seconds: base delay before redelivering a job that hit an
            infrastructure error or a version this worker lacks (doubles per
            redelivery, at most 30 s).
        max_redeliveries: after this many redeliveries for errors (a version no
            worker here has, an unreachable store) a message is dead-lettered as
            exhausted (None: never). Waiting for a busy activation does not count.
        reconcile_interval_seconds: if set, ``worker()`` also runs the reconciler
            every this many seconds.
        stall_seconds: a run without progress for this long counts as stalled.
        publish_timeout: how long a publish keeps trying through a reconnect.
        reconnect_interval: seconds between reconnection attempts to RabbitMQ.
        event_bus, key_prefix, state_ttl_seconds, lease_seconds,
        dedupe_window_seconds, worker_id: see ``BaseDistributedAdapter``.
    """

    concurrent_enqueues = True  # a fan-out's publishes await their confirms together

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        amqp_url: str | None = None,
        amqp_connection: AbstractRobustConnection | None = None,
        amqp_ssl_context: SSLContext | None = None,
        amqp_options: Mapping[str, Any] | None = None,
        postgres_dsn: str | None = None,
        postgres_pool: Any = None,
        postgres_options: Mapping[str, Any] | None = None,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        coordination_store: CoordinationStore | None = None,
        queue_name: str = "flowcraft-jobs",
        table: str = "flowcraft_runs",
        schema: str | None = None,
        concurrency: int = 8,
        retry_mode: RetryMode = "in-process",
        retry_delay_seconds: float = 1.0,
        max_redeliveries: int | None = 50,
        reconcile_interval_seconds: float | None = None,
        stall_seconds: float = 60.0,
        publish_timeout: float = 60.0,
        reconnect_interval: float = 1.0,
        event_bus: EventBus | None = None,
        **options: Any,
    ) -> None:
        if retry_mode not in ("in-process", "queue"):
            raise ValueError(f"retry_mode must be 'in-process' or 'queue', not {retry_mode!r}")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if (coordination_store is None) == (redis_url is None):
            raise ValueError("pass exactly one of redis_url= or coordination_store=")
        owned_store: RedisCoordinationStore | None = None
        if coordination_store is None:
            # The base adapter prefixes every key (key_prefix); the store adds none.
            owned_store = RedisCoordinationStore(
                url=redis_url, key_prefix="", **dict(redis_options or {})
            )
            coordination_store = owned_store
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=coordination_store,
            event_bus=event_bus,
            **options,
        )
        self._owned_store = owned_store
        self.retry_mode: RetryMode = retry_mode
        self.concurrency = concurrency
        self.retry_delay_seconds = retry_delay_seconds
        self.max_redeliveries = max_redeliveries
        self.reconcile_interval_seconds = reconcile_interval_seconds
        self.stall_seconds = stall_seconds
        self.broker = Broker(
            Topology.for_queue(queue_name),
            url=amqp_url,
            connection=amqp_connection,
            ssl_context=amqp_ssl_context,
            reconnect_interval=reconnect_interval,
            publish_timeout=publish_timeout,
            connect_kwargs=amqp_options,
        )
        pg_options = {"max_size": concurrency + 2, **dict(postgres_options or {})}
        if postgres_pool is not None:
            self.store = PostgresRunStore(pool=postgres_pool, table=table, schema=schema)
        else:
            self.store = PostgresRunStore(
                dsn=postgres_dsn, table=table, schema=schema, **pg_options
            )
        self._wake = asyncio.Event()
        self._in_hand: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(broker={self.broker!r}, store={self.store!r})"

    # ------------------------------------------------------------------ the four primitives

    def create_context(self, run_id: str) -> PostgresContext:
        return PostgresContext(self.store, run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        headers: dict[str, Any] = {}
        if self.retry_mode == "queue":
            node = self.node_for(job)
            options = self.get_queue_retry_options(node) if node is not None else None
            if options:
                backoff = options["backoff"]
                headers = {
                    HEADER_MAX_ATTEMPTS: int(options["attempts"]),
                    HEADER_BACKOFF: str(backoff["type"]),
                    HEADER_BACKOFF_MS: math.ceil(backoff["delay"]),
                }
        await self.broker.publish(job.encode(), headers=headers)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        await self.store.publish(run_id, result.to_json_dict())

    async def process_jobs(self, handler: JobHandler) -> None:
        self._wake.clear()
        consumer = await self.broker.consume(
            functools.partial(self._on_message, handler), self.concurrency
        )
        reconciler = (
            asyncio.ensure_future(self._reconcile_forever())
            if self.reconcile_interval_seconds
            else None
        )
        logger.info(
            "worker %s consuming %r (concurrency %d, retry_mode %s)",
            self.worker_id,
            self.broker.topology.queue,
            self.concurrency,
            self.retry_mode,
        )
        try:
            while not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
        except asyncio.CancelledError:
            for task in self._in_hand:
                task.cancel()
            raise
        finally:
            await consumer.cancel()  # no new deliveries; the jobs in hand finish
            if reconciler is not None:
                reconciler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reconciler
            if self._in_hand:
                await asyncio.gather(*self._in_hand, return_exceptions=True)
            await consumer.close()
            logger.info("worker %s stopped", self.worker_id)

    # ------------------------------------------------------------------ retry hooks

    def should_retry_in_process(self, node_def: NodeDefinition) -> bool:
        return self.retry_mode == "in-process"

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        """``{"attempts", "backoff": {"type", "delay"}}`` (delay in ms), from the node's
        config; carried in the headers of the node's messages."""
        if self.retry_mode != "queue":
            return None
        config = node_def.config
        return {
            "attempts": node_def.max_attempts,
            "backoff": {
                "type": config.retry_backoff if config else "fixed",
                "delay": config.retry_delay if config else 0,
            },
        }

    # ------------------------------------------------------------------ delivery

    async def _on_message(self, handler: JobHandler, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_hand.add(task)
        try:
            await self._deliver(handler, message)
        except Exception:
            # Never lose the consumer over one message: unacked, it comes back.
            logger.exception("delivery of a message from %r failed", self.broker.topology.queue)
        finally:
            if task is not None:
                self._in_hand.discard(task)

    async def _deliver(self, handler: JobHandler, message: AbstractIncomingMessage) -> None:
        headers: Mapping[str, Any] = message.headers or {}
        try:
            job = JobPayload.decode(message.body)
        except PayloadDecodeError as exc:
            logger.warning("dead-lettering an undecodable message: %s", exc)
            await self._dead_letter(message, headers, _describe(exc))
            return
        if self.retry_mode == "queue":
            attempt = _int_header(headers, HEADER_ATTEMPT, 1)
            node = self.node_for(job)
            default_attempts = node.max_attempts if node is not None else 1
            attempts = _int_header(headers, HEADER_MAX_ATTEMPTS, default_attempts)
            job = job.model_copy(
                update={"attempt": attempt, "is_last_attempt": attempt >= attempts}
            )
        try:
            await handler(job)
        except Exception as exc:
            if job_disposition(exc) == "dead-letter":
                logger.warning("dead-lettering job %s/%s: %s", job.run_id, job.node_id, exc)
                await self._dead_letter(message, headers, _describe(exc))
            else:
                await self._redeliver(message, headers, job, exc)
            return
        await self._settle(message, "ack")

    async def _redeliver(
        self,
        message: AbstractIncomingMessage,
        headers: Mapping[str, Any],
        job: JobPayload,
        exc: Exception,
    ) -> None:
        """Send the job round again through a delay queue, then ack this delivery.

        ``max_redeliveries`` counts the redeliveries for errors (a version this worker
        lacks, an unreachable store); a busy activation (its lease is held by a live
        worker) and failed queue-mode attempts (bounded by the node's attempts) do not
        use it up.
        """
        failed_attempt = isinstance(exc, RetryJob) and isinstance(exc.__cause__, NodeExecutionError)
        counted = not isinstance(exc, RetryJob)
        retries = _int_header(headers, HEADER_RETRIES, 0) + (1 if counted else 0)
        if counted and self.max_redeliveries is not None and retries > self.max_redeliveries:
            reason = f"exhausted after {retries - 1} redeliveries; last error {_describe(exc)}"
            logger.warning("dead-lettering job %s/%s: %s", job.run_id, job.node_id, reason)
            await self._dead_letter(message, headers, reason)
            return
        new_headers = _own_headers(headers)
        new_headers[HEADER_RETRIES] = retries
        if failed_attempt and self.retry_mode == "queue":
            attempt = job.attempt or 1
            new_headers[HEADER_ATTEMPT] = attempt + 1
            delay_ms = backoff_ms(
                str(headers.get(HEADER_BACKOFF, "fixed")),
                _int_header(headers, HEADER_BACKOFF_MS, 0),
                attempt,
            )
        elif isinstance(exc, RetryJob):
            delay_ms = exc.delay_seconds * 1000
        else:
            logger.info("job %s/%s will be redelivered: %r", job.run_id, job.node_id, exc)
            delay_ms = min(self.retry_delay_seconds * 2 ** max(retries - 1, 0), 30.0) * 1000
        try:
            await self.broker.publish(
                message.body, headers=new_headers, delay_ms=delay_bucket_ms(delay_ms)
            )
        except Exception as publish_error:
            logger.warning("cannot schedule a redelivery (%r); requeueing", publish_error)
            await self._settle(message, "requeue")
            return
        await self._settle(message, "ack")

    async def _dead_letter(
        self, message: AbstractIncomingMessage, headers: Mapping[str, Any], error: str
    ) -> None:
        """Publish the message with its error to the dead-letter exchange, then ack it;
        if that fails, reject it (the work queue dead-letters it, without the error)."""
        new_headers = _own_headers(headers)
        new_headers[HEADER_ERROR] = error
        try:
            await self.broker.publish(message.body, headers=new_headers, dead=True)
        except Exception as publish_error:
            logger.warning("cannot publish a dead letter (%r); rejecting", publish_error)
            await self._settle(message, "reject")
            return
        await self._settle(message, "ack")

    async def _settle(self, message: AbstractIncomingMessage, how: str) -> None:
        """Ack, requeue or reject. On a channel lost meanwhile this fails, and the
        broker redelivers the message: a duplicate, which every job tolerates."""
        try:
            if how == "ack":
                await message.ack()
            elif how == "requeue":
                await message.nack(requeue=True)
            else:
                await message.reject(requeue=False)
            self.broker.round_trips[how] += 1
        except CONNECTION_EXCEPTIONS as exc:
            logger.info("could not %s a message (%r); it will be redelivered", how, exc)

    # ------------------------------------------------------------------ results

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The published result, in one query. (A run whose context says final but whose
        row has no result falls back to the base's reading of the state.)"""
        published, status = await self.store.result(run_id)
        if published is not None:
            return FinalResult(
                run_id=published["runId"],
                status=published["status"],
                context=published["context"],
                errors=list(published.get("errors") or []),
            )
        if status is not None and status.get("status") in _FINAL:
            return await super().get_final_result(run_id)
        return None

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        """Woken by PostgreSQL's NOTIFY from the publication (one shared LISTEN
        connection); while that connection is down, waiters poll as usual."""
        notifications = self.store.notifications
        event = await notifications.watch(run_id)
        try:
            yield ResultWatch(event, lambda: notifications.listening)
        finally:
            notifications.waiters.remove(run_id, event)

    # ------------------------------------------------------------------ operating

    async def reconcile_stalled(
        self, older_than_seconds: float | None = None, *, limit: int = 100
    ) -> list[str]:
        """Reconcile runs with no progress for ``older_than_seconds`` (default
        ``stall_seconds``); returns their ids. Several workers may run this at once:
        each run is claimed by one of them per period."""
        age = self.stall_seconds if older_than_seconds is None else older_than_seconds
        run_ids = await self.store.claim_stalled(age, limit)
        for run_id in run_ids:
            try:
                enqueued = await self.reconcile(run_id)
            except Exception:
                logger.exception("reconciling run %s failed", run_id)
                continue
            logger.info("reconciled stalled run %s (%d jobs enqueued)", run_id, enqueued)
        return run_ids

    async def _reconcile_forever(self) -> None:
        assert self.reconcile_interval_seconds
        while True:
            await asyncio.sleep(self.reconcile_interval_seconds)
            try:
                await self.reconcile_stalled()
            except Exception:
                logger.exception("the reconciler failed; trying again next period")

    async def dead_letters(self, limit: int = 100, *, remove: bool = False) -> list[DeadLetter]:
        """Messages in the dead-letter queue, with their errors (``remove`` deletes them)."""
        return await self.broker.dead_letters(limit, remove=remove)

    async def purge_finished_runs(self, older_than_seconds: float) -> int:
        """Delete runs finished more than ``older_than_seconds`` ago; returns how many."""
        return await self.store.purge_finished(older_than_seconds)

    async def connect(self) -> None:
        """Connect to RabbitMQ and PostgreSQL now (otherwise on first use), declaring the
        queues and creating the tables."""
        await self.broker.declare()
        await self.store.pool()

    async def stop(self) -> None:
        """Stop taking jobs; ``worker()`` returns once the jobs in hand are done."""
        await super().stop()
        self._wake.set()

    async def aclose(self) -> None:
        """Close what this adapter opened (a given connection, pool or store stays open)."""
        await self.broker.aclose()
        await self.store.aclose()
        if self._owned_store is not None:
            await self._owned_store.aclose()

    async def __aenter__(self) -> RabbitMQAdapter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
