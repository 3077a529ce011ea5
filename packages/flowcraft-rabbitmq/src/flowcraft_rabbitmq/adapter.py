"""``RabbitMQAdapter``: flowcraft jobs on RabbitMQ, run state in PostgreSQL, Redis coordination.

The base class (``flowcraft.distributed.adapter.BaseDistributedAdapter``) owns all
orchestration. This module writes its primitives:

* ``enqueue_job``: a persistent message on the durable work queue, confirmed
  by the broker (publisher confirms).
* ``process_jobs``: consume ``prefetch`` messages ahead, ``concurrency`` of them
  handled at once; each delivery goes
  through the base's ``settle`` and its settlement is carried out: ``ack``;
  ``release`` publishes the message again through the delay queue of the wanted
  delay (per-message TTL, dead-lettered back to the work queue), then acks the
  original; ``dead-letter`` publishes it, with the reason, to the dead-letter
  exchange, then acks. A message released ``max_redeliveries`` times for errors
  is dead-lettered as exhausted.
* ``create_context``: :class:`~flowcraft_rabbitmq.context.PostgresContext`.
* ``publish_final_result``: the run row's ``result`` column, written once;
  ``read_final_result`` (and so ``wait_for_result``) reads it in one query.
* ``find_stalled_runs``: the reconciler's candidates, claimed in one statement.
* ``admit`` and ``mark_followed_up`` (the base's hooks for fewer round trips): a
  job's reads and lease in one statement, leases in PostgreSQL beside the runs,
  follow-up marks written behind (``_coordination``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import AsyncIterator, Mapping
from ssl import SSLContext
from typing import Any

from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.context import AsyncContext
from flowcraft.distributed import (
    Admission,
    BaseDistributedAdapter,
    DeadLetter,
    FinalResult,
    JobHandler,
    JobPayload,
    ResultWatch,
    Settlement,
)
from flowcraft.distributed import keys as K
from flowcraft.runtime import RuntimeOptions
from flowcraft_rabbitmq._amqp import ERRORS
from flowcraft_rabbitmq._broker import Broker, Delivery
from flowcraft_rabbitmq._coordination import (
    AdmissionPlan,
    LeaseRouting,
    MarksBehind,
    PostgresLeases,
    admission,
    admission_plan,
)
from flowcraft_rabbitmq._operations import Operations
from flowcraft_rabbitmq._settings import (
    DELAY_BUCKETS_MS,
    HEADER_ERROR,
    HEADER_RETRIES,
    Topology,
    delay_bucket_ms,
)
from flowcraft_rabbitmq._store import PostgresRunStore
from flowcraft_rabbitmq.context import PostgresContext

__all__ = ["RabbitMQAdapter"]

_JITTER = random.Random()

DEFAULT_LEASE_SECONDS = 4.0
"""The activation lease: a killed worker's runs move again within about this long."""

logger = logging.getLogger("flowcraft.rabbitmq")

_MAX_ERROR_CHARS = 2000

_LEASE_PURGE_SECONDS = 10.0
"""How often a worker deletes expired leases from the leases table."""

_MAX_PREFETCH = 65535
"""AMQP 0-9-1's ``basic.qos`` prefetch count is an unsigned short."""


def _int_header(headers: Mapping[str, Any], name: str, default: int) -> int:
    value = headers.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return default


def _own_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's headers of a message (dropping x-death and the last error)."""
    return {k: v for k, v in headers.items() if k.startswith("x-flowcraft-") and k != HEADER_ERROR}


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class RabbitMQAdapter(Operations, BaseDistributedAdapter):
    """A flowcraft worker (and client) on RabbitMQ, PostgreSQL and Redis.

    Args:
        runtime_options: blueprints, registry and the rest of the runtime's setup.
        amqp_url: ``amqp://`` or ``amqps://`` URL of RabbitMQ (``?heartbeat=S`` and
            ``?connection_timeout=MS`` are read too).
        amqp_ssl_context: TLS for ``amqp_url`` (``amqps://`` without one uses the
            system's default context and checks the host name).
        amqp_options: ``heartbeat`` (seconds, default 60: a RabbitMQ silent for two
            intervals is taken for gone), ``connect_timeout`` (seconds, default 10),
            ``client_properties`` (shown in RabbitMQ's connection list).
        postgres_dsn: ``postgresql://`` URL (or ``postgres_pool``).
        postgres_pool: an asyncpg pool to share (not closed by ``aclose``).
        postgres_options: ``asyncpg.create_pool`` options for ``postgres_dsn``
            (``ssl`` for TLS, ``max_size``, ...; ``max_size`` defaults to
            ``concurrency + 2``, of which up to ``concurrency`` serve as the store's
            lanes: see ``PostgresRunStore``).
        redis_url: ``redis://`` or ``rediss://`` URL for the coordination store (or
            ``coordination_store``).
        redis_options: ``RedisCoordinationStore`` client options for ``redis_url``
            (TLS options such as ``ssl_ca_certs``, ``password``, ...).
        coordination_store: any :class:`CoordinationStore` (not closed by ``aclose``).
        queue_name: the work queue; the delay queues, the dead-letter exchange and
            queue are named after it.
        table: the PostgreSQL runs table; ``schema`` its schema.
        concurrency: jobs one worker handles at once.
        prefetch: messages RabbitMQ hands the worker ahead (unacked at most); at least
            ``concurrency`` (its default). More than ``concurrency`` keeps the next jobs
            at hand when one ends, instead of a round trip to the broker; those not
            started when the worker stops go back to the queue.
        max_redeliveries: after this many redeliveries for errors (a version no
            worker here has, an unreachable store) a message is dead-lettered as
            exhausted (None: never). Waiting for a busy activation and failed
            queue-mode attempts (bounded by the node's attempts) do not count.
        publish_timeout: how long a publish keeps trying through a reconnect.
        reconnect_interval: seconds between reconnection attempts to RabbitMQ.
        **options: see ``BaseDistributedAdapter`` (``retry_mode``,
            ``retry_delay_seconds``, ``reconcile_interval_seconds``,
            ``stalled_after_seconds``, ``lease_seconds``, ``key_prefix``, ...).

    Recovery after a worker dies: RabbitMQ requeues its unacknowledged messages as
    soon as its connection drops, and a redelivered job waits (handed back every
    third of the lease) for the dead worker's lease on the activation to expire:
    ``lease_seconds`` (default 4 s here, renewed every third of it while the node
    runs) governs it. Measured with the defaults: the runs move again 4.1 to 4.2 s
    after a SIGKILL (``tests-integration/tests/rabbitmq/test_recovery.py``).
    """

    concurrent_enqueues = True  # a fan-out's publishes await their confirms together
    max_delay_seconds = DELAY_BUCKETS_MS[-1] / 1000  # the longest delay bucket

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        amqp_url: str | None = None,
        amqp_ssl_context: SSLContext | None = None,
        amqp_options: Mapping[str, Any] | None = None,
        postgres_dsn: str | None = None,
        postgres_pool: Any = None,
        postgres_options: Mapping[str, Any] | None = None,
        queue_name: str = "flowcraft-jobs",
        table: str = "flowcraft_runs",
        schema: str | None = None,
        concurrency: int = 8,
        prefetch: int | None = None,
        max_redeliveries: int | None = 50,
        publish_timeout: float = 60.0,
        reconnect_interval: float = 1.0,
        **options: Any,
    ) -> None:
        if not amqp_url:
            raise ValueError("amqp_url is required (amqp:// or amqps://)")
        if isinstance(concurrency, bool) or isinstance(prefetch, bool):
            raise ValueError("concurrency must be an int, and prefetch an int or None")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        window = concurrency if prefetch is None else prefetch
        if window < concurrency:
            raise ValueError("prefetch must be at least concurrency")
        if window > _MAX_PREFETCH:
            raise ValueError(
                f"prefetch must be at most {_MAX_PREFETCH} (AMQP's prefetch count is 16 "
                "bits; it defaults to concurrency)"
            )
        super().__init__(
            runtime_options=runtime_options,
            **{"stalled_after_seconds": 60.0, "lease_seconds": DEFAULT_LEASE_SECONDS, **options},
        )
        self.concurrency = concurrency
        self.prefetch = window
        self._slots = asyncio.Semaphore(concurrency) if self.prefetch > concurrency else None
        self.max_redeliveries = max_redeliveries
        self.broker = Broker(
            Topology.for_queue(queue_name),
            url=amqp_url,
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
                dsn=postgres_dsn, table=table, schema=schema, lanes=concurrency, **pg_options
            )
        # Leases live beside the runs (one admission statement reads the run and takes
        # the lease); every other coordination key stays where it was given (Redis).
        self.leases = PostgresLeases(self.store)
        self.coordination_store = LeaseRouting(
            self.coordination_store, self.leases, self.key_prefix
        )
        self._marks = MarksBehind(self.coordination_store.inner)
        self._plans: dict[tuple[str, Any, str], AdmissionPlan | None] = {}
        self._wake = asyncio.Event()
        self._in_hand: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(broker={self.broker!r}, store={self.store!r})"

    # ------------------------------------------------------------------ the four primitives

    def create_context(self, run_id: str) -> PostgresContext:
        return PostgresContext(self.store, run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.broker.publish(job.encode())

    # ------------------------------------------------------------------ fewer round trips

    async def admit(
        self, ctx: AsyncContext, payload: JobPayload, blueprint: WorkflowBlueprint, holder: str
    ) -> Admission:
        """The job's reads and its lease in one statement (``_coordination``)."""
        plan = self._plan(blueprint, payload.node_id)
        if plan is None or type(ctx) is not PostgresContext or ctx.store is not self.store:
            return await super().admit(ctx, payload, blueprint, holder)
        return await admission(
            self.store,
            payload.run_id,
            plan,
            lease_stem=K.lease_stem(self.key_prefix, payload.run_id, payload.node_id),
            holder=holder,
            lease_seconds=self.lease_seconds,
        )

    def _plan(self, blueprint: WorkflowBlueprint, node_id: str) -> AdmissionPlan | None:
        key = (blueprint.id, blueprint.version, node_id)
        try:
            return self._plans[key]
        except KeyError:
            pass
        analysis = self.runtime.analysis(blueprint)
        plan = None
        if node_id in analysis.nodes:
            plan = admission_plan(
                self.first_read_keys(node_id),
                node_id,
                blueprint.id,
                blueprint.version,
                self.likely_input_keys(analysis, node_id, 1),
                self.likely_input_keys(analysis, node_id, 2),
            )
        self._plans[key] = plan
        return plan

    async def mark_followed_up(self, run_id: str, node_id: str, generation: int) -> None:
        """Written behind, with the other marks of the next few milliseconds."""
        key = K.followed_up(self.key_prefix, run_id, node_id, generation)
        self._marks.add(key, self.dedupe_window_seconds)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        await self.store.publish(run_id, result.to_json_dict())

    async def process_jobs(self, handler: JobHandler) -> None:
        self._wake.clear()
        consumer = await self.broker.consume(
            functools.partial(self._on_message, handler), self.prefetch
        )
        logger.info(
            "worker %s consuming %r (concurrency %d, prefetch %d, retry_mode %s)",
            self.worker_id,
            self.broker.topology.queue,
            self.concurrency,
            self.prefetch,
            self.retry_mode,
        )
        loop = asyncio.get_running_loop()
        purge_at = loop.time() + _LEASE_PURGE_SECONDS
        try:
            while not self.stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                if loop.time() >= purge_at:
                    purge_at = loop.time() + _LEASE_PURGE_SECONDS
                    await self._purge_leases()
        except asyncio.CancelledError:
            for task in self._in_hand:
                task.cancel()
            raise
        finally:
            await consumer.cancel()  # no new deliveries; the jobs in hand finish
            if self._in_hand:
                await asyncio.gather(*self._in_hand, return_exceptions=True)
            await consumer.close()
            logger.info("worker %s stopped", self.worker_id)

    # ------------------------------------------------------------------ delivery

    async def _on_message(self, handler: JobHandler, message: Delivery) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._in_hand.add(task)
        try:
            if self._slots is None:
                await self._deliver(handler, message)
            else:
                async with self._slots:
                    if self.stopping:  # prefetched, never started: back to the queue
                        await self._settle(message, "requeue")
                        return
                    await self._deliver(handler, message)
        except Exception:
            # Never lose the consumer over one message: unacked, it comes back.
            logger.exception("delivery of a message from %r failed", self.broker.topology.queue)
        finally:
            if task is not None:
                self._in_hand.discard(task)

    async def _deliver(self, handler: JobHandler, message: Delivery) -> None:
        headers: Mapping[str, Any] = message.headers or {}
        settlement = await self.settle(message.body, handler)
        if settlement.action == "ack":
            await self._settle(message, "ack")
        elif settlement.action == "dead-letter":
            await self._dead_letter(message, headers, settlement.reason)
        else:
            await self._redeliver(message, headers, settlement)

    async def _redeliver(
        self, message: Delivery, headers: Mapping[str, Any], settlement: Settlement
    ) -> None:
        """Send the job round again through the delay queue of the settlement's delay,
        then ack this delivery. ``max_redeliveries`` counts releases for errors; a busy
        activation and failed queue-mode attempts do not use it up."""
        counted = not (settlement.busy or settlement.failed_attempt)
        retries = _int_header(headers, HEADER_RETRIES, 0) + (1 if counted else 0)
        if counted and self.max_redeliveries is not None and retries > self.max_redeliveries:
            reason = f"exhausted after {retries - 1} redeliveries; last error {settlement.reason}"
            logger.warning("dead-lettering a job: %s", reason)
            await self._dead_letter(message, headers, reason)
            return
        new_headers = _own_headers(headers)
        new_headers[HEADER_RETRIES] = retries
        delay = settlement.delay_seconds
        if counted:
            # Jitter (half to one and a half times the delay, so two delay buckets):
            # messages handed back together come back in a new order. Without it, two
            # jobs bouncing between workers of two blueprint versions could lock into
            # RabbitMQ's round-robin, each always reaching the worker that hands it
            # back, until max_redeliveries dead-lettered them (seen: 1 run in 5 of a
            # mixed-version fleet).
            delay *= 0.5 + _JITTER.random()
        try:
            await self.broker.publish(
                message.body, headers=new_headers, delay_ms=delay_bucket_ms(delay * 1000)
            )
        except Exception as publish_error:
            logger.warning("cannot schedule a redelivery (%r); requeueing", publish_error)
            await self._settle(message, "requeue")
            return
        await self._settle(message, "ack")

    async def _dead_letter(self, message: Delivery, headers: Mapping[str, Any], error: str) -> None:
        """Publish the message with its error to the dead-letter exchange, then ack it;
        if that fails, reject it (the work queue dead-letters it, without the error)."""
        new_headers = _own_headers(headers)
        new_headers[HEADER_ERROR] = _shorten(error)
        try:
            await self.broker.publish(message.body, headers=new_headers, dead=True)
        except Exception as publish_error:
            logger.warning("cannot publish a dead letter (%r); rejecting", publish_error)
            await self._settle(message, "reject")
            return
        await self._settle(message, "ack")

    async def _settle(self, message: Delivery, how: str) -> None:
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
        except ERRORS as exc:
            logger.info("could not %s a message (%r); it will be redelivered", how, exc)

    # ------------------------------------------------------------------ results

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        """The published result, in one query."""
        published, _status = await self.store.result(run_id)
        if published is None:
            return None
        return FinalResult(
            run_id=published["runId"],
            status=published["status"],
            context=published["context"],
            errors=list(published.get("errors") or []),
        )

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

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """Runs with no progress for ``older_than_seconds``, claimed for this reconciler
        in the same statement (concurrent reconcilers split them, once per period)."""
        return await self.store.claim_stalled(older_than_seconds, limit)

    async def dead_letters(self, limit: int = 100, *, remove: bool = False) -> list[DeadLetter]:
        """Messages in the dead-letter queue, with their reasons and headers (``remove``
        deletes them)."""
        return await self.broker.dead_letters(limit, remove=remove)

    async def enqueue_raw(self, body: bytes) -> None:
        await self.broker.publish(body)

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

    async def _purge_leases(self) -> None:
        try:
            await self.leases.purge_expired()
        except Exception as exc:
            logger.warning("could not delete expired leases (%r); next time", exc)

    async def close(self) -> None:
        """Close what this adapter opened (a given connection, pool or store stays open)."""
        await self._marks.flush()
        await self.broker.aclose()
        await self.store.aclose()
