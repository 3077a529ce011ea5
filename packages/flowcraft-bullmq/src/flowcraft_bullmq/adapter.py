"""``BullMQAdapter``: flowcraft's distributed protocol on BullMQ and Redis.

One BullMQ queue carries a job per node activation; a run's state is one Redis
hash (:class:`~flowcraft_bullmq.context.RedisContext`); joins, leases and the
final status go through the core's ``RedisCoordinationStore`` on the same
client. All orchestration is the base class's; this module only consumes,
enqueues, publishes and operates.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bullmq import Queue, Worker
from bullmq.custom_errors import DelayedError, UnrecoverableError

from flowcraft.blueprint import NodeDefinition, WorkflowBlueprint
from flowcraft.context import AsyncContext
from flowcraft.distributed import Admission
from flowcraft.distributed import keys as K
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
)
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.delivery import DeadLetter, describe
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.redis import RedisCoordinationStore, RedisResults
from flowcraft.errors import PayloadDecodeError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft_bullmq._adding import JobAdder
from flowcraft_bullmq._fastpath import (
    READ_LUA,
    MarkBuffer,
    MarkingContext,
    ReadPlan,
    fused_admission,
    make_read_plan,
)
from flowcraft_bullmq._pipelining import AutoPipelineRedis
from flowcraft_bullmq._settings import BullMQSettings, RedisKeys, bullmq_client, make_client
from flowcraft_bullmq._worker import FetchingWorker, ParsingWorker
from flowcraft_bullmq.context import PATCH_LUA, RedisContext, encode, ttl_ms

if TYPE_CHECKING:
    from bullmq import Job
    from redis.asyncio import Redis

__all__ = ["BullMQAdapter"]

logger = logging.getLogger("flowcraft.bullmq")

_MARK_FLUSH_DELAY = 0.05


class BullMQAdapter(BaseDistributedAdapter):
    """Run flowcraft workflows on BullMQ (PyPI ``bullmq``) and Redis.

    Args:
        runtime_options: the registry and blueprints (workers need both; a client
            that only starts runs and waits needs the blueprints).
        connection: a ``redis://`` / ``rediss://`` URL, or a ``redis.asyncio.Redis``
            client (the adapter then leaves it open on :meth:`aclose`).
        coordination_store: defaults to a ``RedisCoordinationStore`` on the same
            client (required for the fast path).
        redis_options: with a URL, passed to every client this adapter makes
            (TLS such as ``ssl_ca_certs``/``ssl_certfile``, ``password``, timeouts).
        settings: a :class:`BullMQSettings`; keyword ``options`` override its fields
            (``queue_name``, ``concurrency``, ``retry_mode``, ``remove_on_complete``,
            ``state_ttl_seconds``, ``lock_duration_seconds``, ...).
    """

    concurrent_enqueues = True  # a fan-out's adds travel in one pipeline

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        connection: str | Redis,
        coordination_store: CoordinationStore | None = None,
        event_bus: EventBus | None = None,
        worker_id: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        settings: BullMQSettings | None = None,
        **options: Any,
    ) -> None:
        base = settings.model_dump() if settings is not None else {}
        self.settings = BullMQSettings.model_validate({**base, **options})
        s = self.settings
        self._redis_options = dict(redis_options or {})
        if isinstance(connection, str):
            self._url: str | None = connection
            self.client: Redis = make_client(
                connection, self._redis_options, max_connections=s.max_connections
            )
        else:
            if self._redis_options:
                raise ValueError("redis_options apply only with a URL; configure the client")
            self._url = None
            # Pipelines this adapter's commands over the given client's pool (which
            # stays the caller's: it is not closed by aclose()).
            self.client = (
                connection
                if isinstance(connection, AutoPipelineRedis)
                else AutoPipelineRedis(connection_pool=connection.connection_pool)
            )
        self.keys = RedisKeys(s.key_prefix)
        inner = coordination_store or RedisCoordinationStore(self.client, key_prefix="")
        self._marks = MarkBuffer()
        # The fast path runs its scripts on the coordination keys: they must live in
        # this adapter's Redis, under a prefix it knows.
        self._fast_prefix: str | None = (
            inner.key_prefix
            if s.fast_path
            and isinstance(inner, RedisCoordinationStore)
            and inner.client is self.client
            else None
        )
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=inner,
            event_bus=event_bus,
            key_prefix=s.key_prefix,
            state_ttl_seconds=s.state_ttl_seconds,
            lease_seconds=s.lease_seconds,
            dedupe_window_seconds=s.dedupe_window_seconds,
            worker_id=worker_id,
            retry_mode=s.retry_mode,
            retry_delay_seconds=s.retry_delay_seconds,
            reconcile_interval_seconds=s.reconcile_interval_seconds,
            stalled_after_seconds=s.stalled_after_seconds,
        )
        self._patch_script = self.client.register_script(PATCH_LUA)
        self._read_script = self.client.register_script(READ_LUA)
        self._plans: dict[tuple[str, str], ReadPlan | None] = {}
        self._queue: Queue | None = None
        self._adder: JobAdder | None = None
        self.results: RedisResults = RedisResults(
            self.client, key_prefix=self.keys.prefix, ttl_seconds=self.state_ttl_seconds
        )
        defaults = s.worker_options()
        self._job_defaults = {k: defaults[k] for k in ("removeOnComplete", "removeOnFail")}
        self._stop_event = asyncio.Event()

    # ------------------------------------------------------------ the four primitives

    def create_context(self, run_id: str) -> RedisContext:
        """The run's hash (with the fast path, its patches carry the buffered marks)."""
        options: dict[str, Any] = {
            "ttl_seconds": self.state_ttl_seconds,
            "index_key": self.keys.active,
            "index_member": run_id,
            "patch_script": self._patch_script,
        }
        if self._marks.active:
            return MarkingContext(
                self.client, self.keys.state(run_id), marks=self._marks, **options
            )
        return RedisContext(self.client, self.keys.state(run_id), **options)

    async def admit(
        self, ctx: AsyncContext, payload: JobPayload, blueprint: WorkflowBlueprint, holder: str
    ) -> Admission:
        """The fast path's fused admission: reads and lease in one script (_fastpath)."""
        plan = self._plan(payload) if self._fast_prefix is not None else None
        if plan is None or not isinstance(ctx, RedisContext):
            return await super().admit(ctx, payload, blueprint, holder)
        stem = K.lease_stem(self.key_prefix, payload.run_id, payload.node_id)
        return await fused_admission(
            self._read_script,
            ctx.key,
            plan,
            lease_stem=f"{self._fast_prefix}{stem}",
            holder=holder,
            lease_ttl_ms=ttl_ms(self.lease_seconds),
            marks=self._marks,
        )

    async def mark_followed_up(self, run_id: str, node_id: str, generation: int) -> None:
        """Written behind while the worker runs (the next script carries it)."""
        if not self._marks.active or self._fast_prefix is None:
            await super().mark_followed_up(run_id, node_id, generation)
            return
        key = K.followed_up(self.key_prefix, run_id, node_id, generation)
        self._marks.add((f"{self._fast_prefix}{key}", "1", ttl_ms(self.dedupe_window_seconds)))

    async def enqueue_job(self, job: JobPayload) -> None:
        opts: dict[str, Any] = {}
        if self.settings.retry_mode == "queue":
            node = self.node_for(job)
            if node is not None:
                opts.update(self.get_queue_retry_options(node) or {})
        await self._add(job.node_id, job.to_wire(), opts)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """``SET NX`` of the result (the first publication wins), then ``PUBLISH`` of
        the run id to wake its waiters: the core's ``RedisResults``."""
        await self.results.publish(result)

    async def process_jobs(self, handler: JobHandler) -> None:
        """Consume the queue until :meth:`stop`; jobs in hand finish first."""
        s = self.settings
        self._stop_event.clear()
        connection = bullmq_client(
            self._url, self._redis_options, self.client, max_connections=s.max_connections
        )
        worker_class = FetchingWorker if s.fetch_next else ParsingWorker
        worker = worker_class(
            s.queue_name,
            functools.partial(self._process, handler),
            {**s.worker_options(), "connection": connection, "name": self.worker_id},
        )
        worker.on("error", _log_worker_error)
        worker.on("stalled", _log_stalled)
        # Without the server version BullMQ rounds its blocking waits up to whole
        # seconds, which delays every backoff and handed-back job (BACKENDS.md).
        await worker.blockingRedisConnection.getRedisVersion()
        self._marks.active = self._fast_prefix is not None
        background = [asyncio.ensure_future(self._flush_marks_until_stopped())]
        runner = asyncio.ensure_future(worker.run())
        stopped = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({runner, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            await _close_worker(worker)  # waits for the jobs in hand
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            # BullMQ's timers may have reconnected after close(): close again, for good.
            await connection.aclose()
            # Background tasks end on the flag (not by cancellation, which a client
            # call in flight could swallow).
            self._stop_event.set()
            self._marks.active = False
            self._marks.wake()
            await asyncio.gather(*background, return_exceptions=True)
            await self._marks.flush(self.client)
        if runner.done() and not runner.cancelled() and runner.exception() is not None:
            raise runner.exception()

    # ------------------------------------------------------------ retry hooks

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        """BullMQ ``attempts`` and ``backoff`` from the node's ``max_retries``,
        ``retry_delay`` (ms) and ``retry_backoff`` (exponential or fixed)."""
        attempts = node_def.max_attempts
        if attempts <= 1:
            return None
        config = node_def.config
        delay = int(config.retry_delay) if config else 0
        kind = config.retry_backoff if config else "exponential"
        return {"attempts": attempts, "backoff": {"type": kind, "delay": delay}}

    # ------------------------------------------------------------ operator API

    async def stop(self) -> None:
        """Stop taking jobs; :meth:`process_jobs` returns once the jobs in hand finish."""
        await super().stop()
        self._stop_event.set()

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """Running runs without progress for ``older_than_seconds``, from the index of
        active runs; runs that ended or wait for ``resume_with_action`` leave the index,
        and a run handed to this reconciler moves to the back of it."""
        cutoff = time.time() - older_than_seconds
        members = await self.client.zrangebyscore(
            self.keys.active, "-inf", cutoff, start=0, num=limit
        )
        found: list[str] = []
        for member in members:
            run_id = member.decode("utf-8") if isinstance(member, bytes) else str(member)
            info = await self.get_status(run_id)
            if info.status != "running":
                await self.client.zrem(self.keys.active, run_id)
                continue
            await self.client.zadd(self.keys.active, {run_id: time.time()}, xx=True)
            found.append(run_id)
        return found

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The most recent jobs in BullMQ's failed set, with their reasons. Read from
        the jobs' raw fields (not through ``Job``, which cannot parse a job whose data
        is not JSON): the body is the data as stored, bytes if it is not UTF-8."""
        scripts = self._get_queue().backend.scripts
        found = await scripts.getJobs(["failed"], 0, limit - 1, False)
        letters: list[DeadLetter] = []
        for jobs_by_type in found:
            for job_id, fields in jobs_by_type:
                raw = dict(zip(fields[::2], fields[1::2], strict=False))
                body: bytes | str = raw.get("data") or ""
                if isinstance(body, str) and not body.isascii():
                    try:
                        body.encode("utf-8")
                    except UnicodeEncodeError:  # bytes that are not UTF-8, as stored
                        body = body.encode("utf-8", "surrogateescape")
                letters.append(DeadLetter(body, str(raw.get("failedReason") or ""), str(job_id)))
        return letters

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Move up to ``limit`` jobs of BullMQ's failed set back to the wait list (one
        server-side step per job: never lost, never doubled)."""
        queue = self._get_queue()
        parked = int(await queue.getFailedCount())
        await queue.backend.retryJobs("failed", limit, round(time.time() * 1000))
        return min(parked, limit)

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Delete jobs of BullMQ's failed set (all of them when ``limit`` is None)."""
        removed = await self._get_queue().clean(0, limit or 0, "failed")
        return len(removed or [])

    async def queue_depth(self) -> int:
        """Jobs waiting, prioritized or delayed (a retry's backoff) in the queue."""
        return int(await self._get_queue().getJobCountByTypes("wait", "prioritized", "delayed"))

    async def active_runs(self, limit: int = 100) -> list[str]:
        """The index of active runs the reconciler reads, least recent progress first
        (read only; a run that ended may linger there until the reconciler's next pass)."""
        members = await self.client.zrange(self.keys.active, 0, limit - 1)
        return [m.decode("utf-8") if isinstance(m, bytes) else str(m) for m in members]

    async def enqueue_raw(self, body: bytes | Any) -> None:
        """Put ``body`` on the queue unchecked as a job's data (for tests and tools):
        bytes exactly as given (the job's stored data, which BullMQ parses as JSON),
        anything else JSON-encoded as ``Queue.add`` would."""
        if isinstance(body, bytes | bytearray | memoryview):
            await self._get_adder().add_raw("raw", bytes(body), self._job_defaults)
        else:
            await self._add("raw", body, {})

    async def close(self) -> None:
        """Close the queue and the clients this adapter made (a given client stays open)."""
        await self.results.aclose()
        if self._queue is not None:
            await self._queue.close()
            self._queue = None
            self._adder = None
        await self.client.aclose()  # closes the pool only if this adapter made it

    # ------------------------------------------------------------ internals

    def _get_queue(self) -> Queue:
        if self._queue is None:
            s = self.settings
            connection = bullmq_client(
                self._url, self._redis_options, self.client, max_connections=s.max_connections
            )
            self._queue = Queue(
                self.settings.queue_name,
                {"connection": connection, "prefix": self.settings.bull_prefix},
            )
        return self._queue

    def _get_adder(self) -> JobAdder:
        if self._adder is None:
            self._adder = JobAdder(self._get_queue())
        return self._adder

    async def _add(self, name: str, data: Any, opts: Mapping[str, Any]) -> None:
        job_opts = {**self._job_defaults, **opts} if opts else self._job_defaults
        await self._get_adder().add(name, data, job_opts)

    def _plan(self, payload: JobPayload) -> ReadPlan | None:
        """The fused read of this node's jobs (None: this worker lacks the blueprint)."""
        cache_key = (payload.blueprint_id, payload.node_id)
        if cache_key in self._plans:
            return self._plans[cache_key]
        plan: ReadPlan | None = None
        blueprint = self.runtime.blueprints.get(payload.blueprint_id)
        if blueprint is not None:
            analysis = self.runtime.analysis(blueprint)
            node_id = payload.node_id
            if node_id in analysis.nodes:
                meta = encode({"blueprintId": blueprint.id, "version": blueprint.version})
                try:
                    plan = make_read_plan(
                        self.first_read_keys(node_id),
                        node_id,
                        meta,
                        self.likely_input_keys(analysis, node_id, 1),
                        self.likely_input_keys(analysis, node_id, 2),
                    )
                except ValueError as exc:  # a core this package does not know: plain calls
                    logger.warning("fast path off for %s: %s", node_id, exc)
        if len(self._plans) > 10_000:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan

    async def _process(self, handler: JobHandler, job: Job, token: str) -> None:
        """BullMQ's processor: the base settles the job; this maps the settlement to
        BullMQ (return: completed; UnrecoverableError: the failed set; a failed
        queue-mode attempt raised for BullMQ's own attempts and backoff; anything
        else back to the delayed set without using an attempt)."""
        data = job.data
        if isinstance(data, str):
            # Not a JSON object: data that did not parse (``ParsingWorker`` hands it
            # over as its raw text, undecodable bytes as lone surrogates) or a bare
            # JSON string. Decoded from its bytes, it is dead-lettered with the reason.
            data = data.encode("utf-8", "surrogateescape")
        try:
            payload = JobPayload.decode(data)
        except PayloadDecodeError as exc:
            logger.warning("dead-lettering BullMQ job %s: %s", job.id, exc)
            raise UnrecoverableError(describe(exc)) from exc
        if self.retry_mode == "queue":
            # BullMQ numbers the attempts: only failures count (hand-backs skip one).
            node = self.node_for(payload)
            attempts = int(job.opts.get("attempts") or (node.max_attempts if node else 1))
            attempt = int(job.attemptsMade) + 1
            payload = payload.model_copy(
                update={"attempt": attempt, "is_last_attempt": attempt >= max(attempts, 1)}
            )
        settlement = await self.settle(payload, handler)
        if settlement.action == "ack":
            return
        if settlement.action == "dead-letter":
            raise UnrecoverableError(settlement.reason)
        if settlement.failed_attempt:
            raise _FailedAttempt(settlement.reason)
        await job.moveToDelayed(int((time.time() + settlement.delay_seconds) * 1000), token)
        raise DelayedError()

    async def _flush_marks_until_stopped(self) -> None:
        while self._marks.active:
            await self._marks.wait()
            if self._marks.active:
                await asyncio.sleep(_MARK_FLUSH_DELAY)
            await self._marks.flush(self.client)


class _FailedAttempt(Exception):
    """A queue-mode attempt failed: BullMQ counts it and schedules the next one."""


async def _close_worker(worker: Worker) -> None:
    """``worker.close()``, which waits for the jobs in hand. It also cancels the idle
    fetch (a ``BZPOPMIN``); should that cancellation get lost in the client, close()
    would wait forever, so idle fetches are cancelled again while it waits."""
    closing = asyncio.ensure_future(worker.close())
    idle_rounds = 0
    while True:
        done, _ = await asyncio.wait({closing}, timeout=1.0)
        if done:
            closing.result()
            return
        idle_rounds = idle_rounds + 1 if not worker.jobs else 0
        if idle_rounds >= 3:
            logger.warning("BullMQ worker close is stuck on an idle fetch; cancelling it again")
            for task in list(worker.processing):
                task.cancel()


def _log_stalled(job_id: str, *args: Any) -> None:
    logger.info("BullMQ job %s stalled (its worker died or blocked); it is redelivered", job_id)


def _log_worker_error(error: BaseException, *args: Any) -> None:
    # "could not renew lock" follows a job that finished while its lock was renewed.
    logger.warning("BullMQ worker: %s", error)
