"""``BaseDistributedAdapter``: all orchestration for running a workflow on a fleet.

Adapters implement four primitives (context, consume, enqueue, publish); this
class owns everything else: commits, joins, loops, retries, failures, the final
status, events and the operator API. The protocol, and why a crash between any
two steps is safe, is written down in ``DISTRIBUTED.md`` beside the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from flowcraft._analysis import Edge, GraphAnalysis, Loop, analyse
from flowcraft._traversal import route
from flowcraft.blueprint import NodeDefinition, WorkflowBlueprint
from flowcraft.context import AsyncContext, Guard, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed._scope import scope_keys
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.results import ResultWatch
from flowcraft.errors import (
    BlueprintError,
    ExpressionError,
    FlowcraftError,
    NodeExecutionError,
    PayloadDecodeError,
    SerializationError,
    StateLimitError,
    UnknownBlueprintError,
    UnknownNodeError,
    VersionMismatchError,
)
from flowcraft.events import EventBus, FlowEvent, emit
from flowcraft.node import NodeResult
from flowcraft.runtime import FlowRuntime, RuntimeOptions

__all__ = [
    "BaseDistributedAdapter",
    "FinalResult",
    "JobHandler",
    "RetryJob",
    "RunConflictError",
    "RunStatusInfo",
    "job_disposition",
]

logger = logging.getLogger("flowcraft.distributed")

JobHandler = Callable[[JobPayload], Awaitable[None]]
Disposition = Literal["ack", "retry", "dead-letter"]
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


class RetryJob(FlowcraftError):
    """Deliver this job again later (the activation is busy elsewhere, or a
    queue-mode attempt failed). ``delay_seconds`` is a hint for the queue."""

    def __init__(self, message: str, *, delay_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.delay_seconds = delay_seconds


class RunConflictError(FlowcraftError, ValueError):
    """An operator call conflicts with the run as it is: a start with a run id already
    used by another request, or a resume that another call (or the run's end) beat."""


def job_disposition(exc: BaseException | None) -> Disposition:
    """What a queue should do with a job whose handler ended with ``exc``.

    ``retry`` also covers a version this worker lacks (hand it back for a
    compatible worker) and infrastructure errors (store unreachable).
    """
    if exc is None:
        return "ack"
    if isinstance(exc, RetryJob | VersionMismatchError):
        return "retry"
    if isinstance(
        exc,
        PayloadDecodeError
        | UnknownBlueprintError
        | UnknownNodeError
        | BlueprintError
        | StateLimitError,
    ):
        return "dead-letter"
    return "retry"


@dataclass(slots=True)
class FinalResult:
    """What ``publish_final_result`` publishes and ``wait_for_result`` returns."""

    run_id: str
    status: str
    context: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "status": self.status,
            "context": self.context,
            "errors": self.errors,
        }


@dataclass(slots=True)
class RunStatusInfo:
    run_id: str
    status: str  # running | awaiting | completed | failed | cancelled | unknown
    errors: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)


class BaseDistributedAdapter(ABC):
    """Subclass and implement ``create_context``, ``process_jobs``, ``enqueue_job``
    and ``publish_final_result``; override the hooks to use queue-native retries."""

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        event_bus: EventBus | None = None,
        key_prefix: str = "flowcraft:",
        state_ttl_seconds: float = 7 * 24 * 3600,
        lease_seconds: float = 15.0,
        dedupe_window_seconds: float = 300.0,
        worker_id: str | None = None,
    ) -> None:
        self.runtime = FlowRuntime(runtime_options)
        self.coordination_store = coordination_store
        self.event_bus = event_bus if event_bus is not None else runtime_options.event_bus
        self.key_prefix = key_prefix
        self.state_ttl_seconds = state_ttl_seconds
        self.lease_seconds = lease_seconds
        self.dedupe_window_seconds = dedupe_window_seconds
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.logger = runtime_options.logger or logger
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ the seed's contract

    @abstractmethod
    def create_context(self, run_id: str) -> AsyncContext:
        """The run's state in the adapter's store (one row/item/hash per run)."""

    @abstractmethod
    async def process_jobs(self, handler: JobHandler) -> None:
        """Consume jobs until ``stop()``; ack after ``handler`` returns, else act on
        ``job_disposition(exc)``."""

    @abstractmethod
    async def enqueue_job(self, job: JobPayload) -> None:
        """Put a job on the queue (applying ``get_queue_retry_options`` if used)."""

    @abstractmethod
    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Publish the final result, idempotently: keep the FIRST result published for a
        run. A finalizer redone after a crash, or racing a duplicate of its job, calls
        this again with the same status and errors, but its context may also hold the
        writes of nodes nobody waited for (branches an ``any`` join or a failure left
        running), so a repeat must not replace what was published."""

    concurrent_enqueues: ClassVar[bool] = False
    """Set True when ``enqueue_job`` may run concurrently and its round trips then
    overlap (a pipelining client, a confirm channel): ``enqueue_jobs`` sends a batch's
    jobs all at once instead of one after another."""

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """Enqueue several jobs (a fan-out's successors, a run's start nodes) through
        ``enqueue_job``: one after another, or all at once (``concurrent_enqueues``).
        Override for a batch send; all are attempted before an error is raised."""
        if not self.concurrent_enqueues:
            for job in jobs:
                await self.enqueue_job(job)
            return
        outcomes = await asyncio.gather(
            *(self.enqueue_job(job) for job in jobs), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def should_retry_in_process(self, node_def: NodeDefinition) -> bool:
        """False: run one attempt per delivery and let the queue schedule retries."""
        return True

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        """Queue-specific retry options for a node's jobs (e.g. attempts and backoff)."""
        return None

    # ------------------------------------------------------------ helpers for adapters

    def blueprint_for(self, blueprint_id: str) -> WorkflowBlueprint:
        return self.runtime.blueprint(blueprint_id)

    def node_for(self, job: JobPayload) -> NodeDefinition | None:
        """The node a job names, if this worker knows its blueprint."""
        bp = self.runtime.blueprints.get(job.blueprint_id)
        if bp is None:
            return None
        return analyse(bp).nodes.get(job.node_id)

    async def worker(self) -> None:
        """Process jobs until ``stop()`` (what a worker process runs)."""
        self._stopping.clear()
        await self.process_jobs(self.handle_job)

    async def stop(self) -> None:
        """Ask ``process_jobs`` to finish: no new jobs; jobs in hand complete."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------ operator API

    async def start_run(
        self,
        blueprint_id: str,
        initial_context: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create the run's state and enqueue its start nodes.

        Create-if-absent: the state is written by one patch guarded on the run's meta
        being absent, so a start never writes over a run. The same request again (same
        blueprint, version and initial context: a retry after a crash or a lost reply)
        writes nothing and enqueues the start nodes again (duplicates are harmless); any
        other request for an existing ``run_id`` raises :class:`RunConflictError`."""
        blueprint = self.blueprint_for(blueprint_id)
        analysis = analyse(blueprint)
        run_id = run_id or uuid.uuid4().hex
        initial = dict(initial_context or {})
        for key in initial:
            if K.is_reserved(key):
                raise ValueError(f"context key {key!r} is reserved for flowcraft")
        request = _fingerprint(blueprint, initial)
        ctx = self.create_context(run_id)
        meta = {"blueprintId": blueprint.id, "version": blueprint.version}
        ops = [PatchOperation("set", k, v) for k, v in initial.items()]
        ops.append(PatchOperation("set", K.META, meta))
        ops.append(PatchOperation("set", K.REQUEST, request))
        ops.append(PatchOperation("set", K.STATUS, {"status": "running", "errors": []}))
        for node_id in analysis.start_nodes:
            ops.append(PatchOperation("set", K.activation(node_id, 1), {"skip": False}))
        if not await ctx.patch(ops, guard={K.META: None}):
            found = await ctx.get_many([K.META, K.REQUEST])
            if found.get(K.META) != meta or found.get(K.REQUEST) != request:
                raise RunConflictError(
                    f"run {run_id!r} already exists (blueprint "
                    f"{(found.get(K.META) or {}).get('blueprintId')!r}) and was started by "
                    "another request; a start may be repeated only with the same blueprint, "
                    "version and initial context"
                )
            self.logger.debug("run %s: the same start again; enqueueing its start nodes", run_id)
        await emit(
            self.event_bus, FlowEvent("workflow:start", run_id, None, {"blueprintId": blueprint.id})
        )
        await self._enqueue(run_id, blueprint, *analysis.start_nodes)
        return run_id

    async def get_status(self, run_id: str) -> RunStatusInfo:
        ctx = self.create_context(run_id)
        record = await ctx.get(K.STATUS)
        if record is None:
            return RunStatusInfo(run_id, "unknown")
        final = _claimed_status(await self.coordination_store.get(K.final(self.key_prefix, run_id)))
        status = final or record.get("status", "running")
        waiting: list[str] = []
        meta = await ctx.get(K.META)
        if status == "awaiting" and meta:
            bp = self.runtime.blueprints.get(meta["blueprintId"])
            if bp is not None:
                found = await ctx.get_many([K.waiting(n.id) for n in bp.nodes])
                waiting = sorted(k[len(K.waiting("")) :] for k in found)
        return RunStatusInfo(run_id, status, list(record.get("errors", [])), waiting)

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The final result if the run has ended (adapters may read their published copy)."""
        info = await self.get_status(run_id)
        if info.status not in FINAL_STATUSES:
            return None
        ctx = self.create_context(run_id)
        return FinalResult(run_id, info.status, _user_view(await ctx.to_dict()), info.errors)

    async def wait_for_result(
        self,
        run_id: str,
        timeout: float | None = None,  # noqa: ASYNC109 (the operator API of PRODUCT.md)
        *,
        poll_interval: float = 0.05,
    ) -> FinalResult:
        """Wait for the run's final result (raises ``TimeoutError``). Polls, backing off
        from ``poll_interval``; an adapter whose ``watch_result`` is woken by the
        publication returns at once and polls only as a fallback."""
        loop = asyncio.get_running_loop()
        deadline = math.inf if timeout is None else loop.time() + timeout
        late = TimeoutError(f"run {run_id!r} did not finish within {timeout} s")
        async with contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout_at(None if timeout is None else deadline):
                    watch = await stack.enter_async_context(self.watch_result(run_id))
            except TimeoutError:
                raise late from None
            delay = poll_interval
            while True:
                result = await self.get_final_result(run_id)
                if result is not None:
                    return result
                # The deadline is checked here, not left to one cancellation: Python
                # 3.11's wait_for can swallow a cancellation, and this loop must end.
                pause = min(delay, deadline - loop.time())
                if pause <= 0:
                    raise late
                if watch is None:
                    await asyncio.sleep(pause)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await watch.event.wait()
                    watch.event.clear()
                live = watch is not None and watch.live()
                delay = min(delay * 1.5, 5.0 if live else 1.0)

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        """Override to wake ``wait_for_result`` when ``run_id``'s result is published:
        yield a :class:`ResultWatch` whose event the adapter sets then (a shared LISTEN
        or SUBSCRIBE connection, say). None (the default): waiters only poll."""
        yield None

    async def resume_with_action(
        self,
        run_id: str,
        action: str | None = None,
        output: Any = None,
        *,
        node_id: str | None = None,
    ) -> None:
        """Resume a run paused at a wait node with that node's result.

        The resolution is committed by one patch guarded on the node still waiting at
        that activation (and the run not ended): of two concurrent resumes exactly one
        is applied, the other raises :class:`RunConflictError`."""
        ctx = self.create_context(run_id)
        meta = await ctx.get(K.META)
        if meta is None:
            raise FlowcraftError(f"run {run_id!r} does not exist")
        claim = await self.coordination_store.get(K.final(self.key_prefix, run_id))
        if claim is not None:
            raise RunConflictError(
                f"run {run_id!r} has ended ({_claimed_status(claim)}); there is nothing to resume"
            )
        blueprint = self.blueprint_for(meta["blueprintId"])
        analysis = analyse(blueprint)
        candidates = [node_id] if node_id else list(analysis.nodes)
        found = await ctx.get_many([K.waiting(n) for n in candidates])
        paused = {k[len(K.waiting("")) :]: int(v) for k, v in found.items()}
        if not paused:  # never paused, or resumed already (by a concurrent call, say)
            raise RunConflictError(f"run {run_id!r} has no node waiting to resume")
        if len(paused) > 1:
            raise FlowcraftError(f"run {run_id!r}: several nodes wait ({sorted(paused)}); name one")
        ((waiting_id, generation),) = paused.items()
        result = NodeResult(output=output, action=action)
        applied = await self._commit(
            _Job(run_id, blueprint, analysis, waiting_id, ctx),
            generation,
            result,
            [],
            protocol_ops=[
                PatchOperation("delete", K.waiting(waiting_id)),
                PatchOperation("set", K.STATUS, {"status": "running", "errors": []}),
            ],
            guard={K.waiting(waiting_id): generation},
            on_commit=lambda: emit(
                self.event_bus, FlowEvent("workflow:resume", run_id, waiting_id)
            ),
        )
        if not applied:
            raise RunConflictError(
                f"run {run_id!r}: {waiting_id!r} (activation {generation}) was resumed by "
                "another call, or the run ended, meanwhile; this resume was not applied"
            )

    async def cancel_run(self, run_id: str, reason: str = "cancelled by the operator") -> str:
        """End the run as ``cancelled`` and return its final status.

        The run's one final status is claimed like a completion or a failure (the
        first ``set_if_not_exist`` of ``final:run`` wins), so a cancel racing the run's
        completion gives exactly one final status. The winner fences the state first
        (``_flowcraft.end``: every later commit, pause or resume is refused), then
        publishes the result (errors: the reason) and records the status. Queued jobs
        drop themselves on that status; running nodes see ``NodeContext.cancelled``
        (and a cancellation at their next await) at their next heartbeat.

        A run that already ended is left alone: the call returns its status
        (``completed``, ``failed``, or ``cancelled`` by an earlier call). A run that
        does not exist raises :class:`FlowcraftError`."""
        ctx = self.create_context(run_id)
        meta = await ctx.get(K.META)
        if meta is None:
            raise FlowcraftError(f"run {run_id!r} does not exist")
        analysis = analyse(self.blueprint_for(meta["blueprintId"]))
        claim = f"cancelled:{reason}"
        store = self.coordination_store
        final_key = K.final(self.key_prefix, run_id)
        if await store.set_if_not_exist(final_key, claim, self.state_ttl_seconds):
            self.logger.info("run %s: cancelled (%s)", run_id, reason)
            await self._finalize(run_id, "cancelled", ctx, analysis, owner=reason)
            return "cancelled"
        existing = await store.get(final_key)
        if existing is None:
            raise FlowcraftError(f"run {run_id!r}: its final status expired; nothing to cancel")
        status = _claimed_status(existing) or "failed"
        # Make sure the run that ended first is published and recorded (its finalizer
        # may have died), as reconcile does.
        record = await ctx.get(K.STATUS)
        if record is None or record.get("status") not in FINAL_STATUSES:
            await self._finalize(run_id, status, ctx, analysis, owner=existing.partition(":")[2])
        return status

    async def reconcile(self, run_id: str) -> int:
        """Re-drive a run after crashes: re-enqueue pending activations and redo
        every resolved node's follow-up (all idempotent). Returns jobs enqueued."""
        ctx = self.create_context(run_id)
        meta = await ctx.get(K.META)
        if meta is None:
            return 0
        claim = await self.coordination_store.get(K.final(self.key_prefix, run_id))
        status = _claimed_status(claim)
        if claim is not None and status in FINAL_STATUSES:
            record = await ctx.get(K.STATUS)
            if record is None or record.get("status") not in FINAL_STATUSES:
                analysis = analyse(self.blueprint_for(meta["blueprintId"]))
                owner = claim.partition(":")[2]
                # make sure it was published
                await self._finalize(run_id, status, ctx, analysis, owner=owner)
            return 0
        blueprint = self.blueprint_for(meta["blueprintId"])
        analysis = analyse(blueprint)
        job = _Job(run_id, blueprint, analysis, "", ctx)
        counts = await ctx.get_many([K.resolved(n) for n in analysis.nodes])
        waits = await ctx.get_many([K.waiting(n) for n in analysis.nodes])
        pending_keys = [
            K.activation(n, int(counts.get(K.resolved(n), 0)) + 1) for n in analysis.nodes
        ]
        pending = await ctx.get_many(pending_keys)
        enqueued = 0
        for n in analysis.nodes:
            resolved = int(counts.get(K.resolved(n), 0))
            if K.activation(n, resolved + 1) in pending and K.waiting(n) not in waits:
                await self._enqueue(run_id, blueprint, n)
                enqueued += 1
            if resolved:
                job.node_id = n
                await self._follow_up(job, resolved, redrive=True)
        return enqueued

    # ------------------------------------------------------------ the job handler

    async def handle_job(self, job: JobPayload) -> None:
        """Process one job. Returns normally when the job is done with (ack); raises
        ``RetryJob``/``VersionMismatchError`` to hand it back and bad-input errors to
        dead-letter it (see ``job_disposition``)."""
        try:
            await self._handle(job)
        except (RetryJob, VersionMismatchError) as exc:
            await emit(
                self.event_bus,
                FlowEvent("job:requeued", job.run_id, job.node_id, {"reason": str(exc)}),
            )
            raise
        except Exception as exc:
            await emit(
                self.event_bus,
                FlowEvent("job:failed", job.run_id, job.node_id, {"error": repr(exc)}),
            )
            raise
        await emit(self.event_bus, FlowEvent("job:processed", job.run_id, job.node_id))

    async def _handle(self, payload: JobPayload) -> None:
        blueprint = self.runtime.blueprints.get(payload.blueprint_id)
        if blueprint is None:
            raise UnknownBlueprintError(
                f"job for run {payload.run_id!r}: this worker has no blueprint "
                f"{payload.blueprint_id!r}"
            )
        node_id = payload.node_id
        ctx = self.create_context(payload.run_id)
        read_at = _now()
        state = await ctx.get_many(self.first_read_keys(node_id))
        meta = state.get(K.META)
        if meta is None:
            raise UnknownBlueprintError(
                f"job for unknown run {payload.run_id!r} (never started, or expired)"
            )
        if meta.get("blueprintId") != blueprint.id:
            # Not a version this worker lacks: the job belongs to no run of its
            # blueprint, and no worker will ever take it. Dead-letter it with the reason.
            raise UnknownBlueprintError(
                f"job names blueprint {blueprint.id!r}, but run {payload.run_id!r} is a run "
                f"of blueprint {meta.get('blueprintId')!r}: the job is not this run's"
            )
        if meta.get("version") != blueprint.version:
            # Checked before the node: a node only the newer version has must reach a
            # newer worker (rolling deploy), not be dead-lettered here.
            raise VersionMismatchError(
                f"run {payload.run_id!r} needs blueprint {meta.get('blueprintId')!r} version "
                f"{meta.get('version')!r}; this worker has version {blueprint.version!r}"
            )
        analysis = analyse(blueprint)
        if node_id not in analysis.nodes:
            raise UnknownNodeError(
                f"job for run {payload.run_id!r}: blueprint {blueprint.id!r} version "
                f"{blueprint.version!r} has no node {node_id!r}"
            )
        status = (state.get(K.STATUS) or {}).get("status")
        if status in FINAL_STATUSES:
            self.logger.debug("run %s is %s; dropping job for %s", payload.run_id, status, node_id)
            return
        job = _Job(payload.run_id, blueprint, analysis, node_id, ctx)
        resolved = int(state.get(K.resolved(node_id), 0))
        generation = resolved + 1
        record_key = K.activation(node_id, generation)
        guess = self.likely_input_keys(analysis, node_id, generation)
        found = await ctx.get_many([record_key, K.waiting(node_id), *guess])
        record = found.get(record_key)
        if record is None or K.waiting(node_id) in found:
            # Already done (a duplicate or a redelivery) or paused. Unless the
            # follow-up is known complete, redo it (idempotent), then ack.
            await emit(
                self.event_bus,
                FlowEvent("job:duplicate", job.run_id, node_id, {"resolved": resolved}),
            )
            if resolved and record is None:
                done = K.followed_up(self.key_prefix, job.run_id, node_id, resolved)
                if await self.coordination_store.get(done) is None:
                    await self._follow_up(job, resolved, redrive=True)
            return
        # The lease's value names this job, not only this worker: two deliveries of one
        # activation may land on the same worker.
        lease = _Lease(
            K.lease(self.key_prefix, job.run_id, node_id, generation),
            f"{self.worker_id}/{uuid.uuid4().hex[:12]}",
            _now(),
        )
        if not await self.coordination_store.set_if_not_exist(
            lease.key, lease.holder, self.lease_seconds
        ):
            raise RetryJob(
                f"{node_id!r} activation {generation} of run {job.run_id!r} is running elsewhere",
                delay_seconds=min(self.lease_seconds / 3, 5.0),
            )
        # The lease only saves duplicate work: correctness rests on the guarded writes
        # (every resolution of this activation is guarded on ``n.X == g - 1``), never on
        # lease timing. It is left to expire: deleting it would cost a round trip per
        # job, and a later duplicate is stopped by the resolved count, not the lease.
        job.lease = lease
        if _now() - read_at >= self.lease_seconds / 2:
            # Stalled between reading the state and taking the lease: another delivery
            # may have run this activation and its lease expired since. Read again
            # (to skip a needless execution; the commit's guard would refuse it anyway).
            again = await ctx.get(K.resolved(node_id))
            if int(again or 0) != resolved:
                raise RetryJob(f"{node_id!r} of run {job.run_id!r} moved on while stalled")
        job.task = asyncio.current_task()
        heartbeat = _Heartbeat(functools.partial(self._beat, job), self.lease_seconds / 3)
        try:
            if record.get("skip"):
                if not await self._commit(job, generation, None, []):
                    await self._refused(job, generation)
            else:
                await self._execute(job, payload, generation, record, found)
        finally:
            await heartbeat.stop()

    async def _beat(self, job: _Job) -> None:
        """One heartbeat: extend the lease if it is still this delivery's, and look for
        the run's final status (a cancel, or an end the node's branch was not waited
        for): then signal the node's cancellation.

        A failed beat is tried again at the next one: giving up would let the lease
        lapse under a live job. Neither outcome is trusted for correctness: a lease
        extended late, or a holder read from a late reply, can at worst let two
        deliveries run the activation; the commit's guard lets one of them resolve it."""
        lease = job.lease
        store = self.coordination_store
        if lease is not None and not lease.lost:
            try:
                if await store.get(lease.key) != lease.holder:
                    lease.lost = True  # another delivery's lease now: never extend it
                elif await store.extend_ttl(lease.key, self.lease_seconds):
                    lease.held_at = _now()
            except Exception as exc:
                self.logger.warning("heartbeat of %s failed: %r", lease.key, exc)
        try:
            claim = await store.get(K.final(self.key_prefix, job.run_id))
        except Exception as exc:
            self.logger.warning("heartbeat of run %s failed: %r", job.run_id, exc)
            return
        if claim is not None:
            self._stop_node(job, f"run {job.run_id!r} ended ({_claimed_status(claim)})")

    def _stop_node(self, job: _Job, why: str) -> None:
        """Signal the node's cancellation; a node still executing also gets a
        cancellation at its next await, and the job then ends (acked: the run ended)."""
        if job.cancelled.is_set():
            return
        self.logger.info("stopping %s of run %s: %s", job.node_id, job.run_id, why)
        job.cancelled.set()
        if job.executing and job.task is not None:
            job.stopped = True
            job.task.cancel()

    async def _release_lease(self, job: _Job) -> None:
        """Free the activation for the next delivery after a failed queue-mode attempt,
        only while the lease is still this delivery's (another may hold it by now)."""
        lease = job.lease
        if lease is None or lease.lost:
            return
        store = self.coordination_store
        if await store.get(lease.key) == lease.holder:
            await store.delete(lease.key)

    @staticmethod
    def first_read_keys(node_id: str) -> list[str]:
        """What a job of ``node_id`` reads first (step 2 in DISTRIBUTED.md), in this
        order. An adapter that fuses a job's reads and its lease into one round trip
        recognises the job's first ``get_many`` by these keys."""
        return [K.META, K.STATUS, K.resolved(node_id)]

    @staticmethod
    def likely_input_keys(analysis: GraphAnalysis, node_id: str, generation: int) -> list[str]:
        """Output keys activation ``generation`` of the node probably takes its input
        from. The handler's second read (step 3) asks for them with the activation
        record; they depend only on whether ``generation`` is the first."""
        required = analysis.required(node_id, generation)
        if generation > 1 and not required:
            loop = analysis.loop_of.get(node_id)
            if loop is not None and loop.head == node_id:
                return [
                    K.output(e.source)
                    for t in loop.tails
                    for e in analysis.out[t]
                    if e.kind == "back"
                ]
        return [K.output(p) for p in required] if len(required) == 1 else []

    async def _execute(
        self,
        job: _Job,
        payload: JobPayload,
        generation: int,
        record: Mapping[str, Any],
        found: Mapping[str, Any],
    ) -> None:
        node = job.analysis.nodes[job.node_id]
        in_process = self.should_retry_in_process(node)
        attempt = payload.attempt or 1
        last = (
            True
            if in_process
            else (
                payload.is_last_attempt
                if payload.is_last_attempt is not None
                else attempt >= node.max_attempts
            )
        )
        node_input = await self._input(job, node, record, found)
        job.executing = True
        try:
            execution = await self.runtime.execute_node(
                job.blueprint,
                job.node_id,
                job.ctx,
                run_id=job.run_id,
                input=node_input,
                activation=generation,
                attempt=attempt,
                max_attempts=None if in_process else 1,
                use_fallback=last,
                cancel=job.cancelled,
            )
        except asyncio.CancelledError:
            task = job.task
            if job.stopped and task is not None and task.uncancel() == 0:
                # Stopped by the run's end (see _beat): nothing to commit, ack.
                self.logger.info("run %s ended while %s ran; job dropped", job.run_id, job.node_id)
                return
            raise
        except NodeExecutionError as exc:
            await self._failed_attempt(job, generation, exc, attempt=attempt, last=last)
            return
        finally:
            job.executing = False
        if execution.awaiting:
            paused = await job.ctx.patch(
                [
                    PatchOperation("set", K.waiting(job.node_id), generation),
                    PatchOperation("set", K.STATUS, {"status": "awaiting", "errors": []}),
                ],
                guard={**_fence(job.node_id, generation), K.waiting(job.node_id): None},
            )
            if not paused:  # resumed or resolved by another delivery, or the run ended
                await self._refused(job, generation)
                return
            await emit(self.event_bus, FlowEvent("node:awaiting", job.run_id, job.node_id))
            return
        reserved = [op.key for op in execution.deltas if K.is_reserved(op.key)]
        if reserved:
            # A programming error, not a store problem: fail the node (after its
            # attempts in queue mode) instead of redelivering the job forever.
            error = NodeExecutionError(
                f"node {job.node_id!r} wrote the reserved context key {reserved[0]!r}: keys "
                f"starting with {K.RESERVED_PREFIX!r} belong to flowcraft's protocol",
                node_id=job.node_id,
            )
            await self._failed_attempt(job, generation, error, attempt=attempt, last=last)
            return
        try:
            committed = await self._commit(job, generation, execution.result, execution.deltas)
        except (ExpressionError, StateLimitError, SerializationError) as exc:
            # Deterministic: redelivering would fail the same way. Nothing was
            # committed (the patch is atomic), so fail the run with the reason.
            await self._fail(
                job, generation, NodeExecutionError(str(exc), node_id=job.node_id, cause=exc)
            )
            return
        if not committed:
            await self._refused(job, generation)

    async def _failed_attempt(
        self, job: _Job, generation: int, exc: NodeExecutionError, *, attempt: int, last: bool
    ) -> None:
        """An attempt failed: hand the job back for the queue's next attempt, or, after
        the last one, fail the node."""
        if not last:
            # This attempt is over: free the activation for the next delivery (else
            # it waits out the lease, and each lease-busy delivery burns an attempt).
            await self._release_lease(job)
            raise RetryJob(
                f"node {job.node_id!r} attempt {attempt} failed: {exc}; the queue will retry"
            ) from exc
        await self._fail(job, generation, exc)

    async def _refused(self, job: _Job, generation: int) -> None:
        """A guarded write of this activation was refused: another delivery (or the
        operator) resolved it first, or the run ended. Nothing was written; behave as
        the duplicate this job turned out to be: redo the follow-up, then ack."""
        state = await job.ctx.get_many([K.resolved(job.node_id), K.ENDED])
        resolved = int(state.get(K.resolved(job.node_id), 0))
        await emit(
            self.event_bus,
            FlowEvent(
                "job:duplicate",
                job.run_id,
                job.node_id,
                {"resolved": resolved, "refused": generation},
            ),
        )
        if K.ENDED not in state and resolved >= generation:
            await self._follow_up(job, generation, redrive=True)

    async def _input(
        self, job: _Job, node: NodeDefinition, record: Mapping[str, Any], found: Mapping[str, Any]
    ) -> Any:
        spec = node.inputs
        if spec is not None:
            exprs = [spec] if isinstance(spec, str) else list(spec.values())
            wanted = {k for e in exprs for k in (scope_keys(e) | {e})}
            scope = await job.ctx.get_many(sorted(wanted))
            return self.runtime.resolve_input(node, {}, scope)
        handed: dict[str, Any] = {}
        refs: dict[str, str] = {}
        for pred, item in (record.get("inputs") or {}).items():
            if "value" in item:
                handed[pred] = item["value"]
            else:
                refs[pred] = item["ref"]
        missing = [r for r in refs.values() if r not in found]
        extra = await job.ctx.get_many(missing) if missing else {}
        for pred, ref in refs.items():
            handed[pred] = found[ref] if ref in found else extra.get(ref)
        return self.runtime.resolve_input(node, handed, {}, gathered=bool(record.get("gathered")))

    # ------------------------------------------------------------ commit and follow-up

    async def _commit(
        self,
        job: _Job,
        generation: int,
        result: NodeResult | None,
        deltas: list[PatchOperation],
        *,
        protocol_ops: Iterable[PatchOperation] = (),
        guard: Guard | None = None,
        on_commit: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Commit one resolution atomically: output, deltas, the resolved count, the
        decision, and the activation records of single-predecessor successors.
        ``protocol_ops`` (reserved keys the caller changes) join the same patch.

        The patch is guarded on the activation still being pending (``n.X == g - 1``)
        and the run not ended, plus ``guard``: False when it was refused (nothing
        written, no follow-up: the caller decides); ``on_commit`` is awaited right
        after an applied patch."""
        analysis = job.analysis
        node_id = job.node_id
        ops = list(deltas)
        ops.extend(protocol_ops)
        chosen: list[Edge] = []
        if result is not None:
            scope = await self._scope(job, result, deltas)
            chosen = route(analysis, node_id, result, scope, self.runtime.evaluator)
            handed = {e.index: self._handover(analysis, e, result.output, scope) for e in chosen}
            ops.append(PatchOperation("set", K.output(node_id), result.output))
        else:
            handed = {}
        decision = {
            "skip": result is None,
            "chosen": [e.index for e in chosen],
            "handed": {str(i): v for i, v in handed.items()},
        }
        ops.append(PatchOperation("set", K.decision(node_id, generation), decision))
        ops.append(PatchOperation("set", K.resolved(node_id), generation))
        for target, gen, taken in self._signals(analysis, node_id, generation, chosen):
            if not analysis.is_join(target, gen) and not (
                gen > 1 and not analysis.required(target, gen)
            ):
                ops.append(
                    PatchOperation(
                        "set", K.activation(target, gen), _record(node_id, taken, handed)
                    )
                )
        fence = _fence(node_id, generation)
        if guard:
            fence.update(guard)
        if not await job.ctx.patch(ops, guard=fence):
            return False
        if on_commit is not None:
            await on_commit()
        if self.event_bus is not None:
            event = "node:skipped" if result is None else "node:finish"
            await emit(
                self.event_bus, FlowEvent(event, job.run_id, node_id, {"activation": generation})
            )
        await self._follow_up(job, generation, redrive=False, decision=decision)
        return True

    def _handover(
        self, analysis: GraphAnalysis, edge: Edge, output: Any, scope: Mapping[str, Any]
    ) -> Any:
        """What the edge hands its target: a reference to the source's output key, the
        output itself, or the edge's transform of it.

        By value inside a loop that has an ``any`` join: the branch that join did not
        wait for can lag an iteration behind, and by the time it runs the output key
        holds the next iteration's output."""
        if edge.transform is None:
            return output if edge.intra and _has_any_join(analysis, edge.source) else _REF
        return self.runtime.apply_edge_transform(edge.definition, output, scope)

    async def _scope(
        self, job: _Job, result: NodeResult, deltas: list[PatchOperation]
    ) -> dict[str, Any]:
        """The context keys this node's edge expressions read (not the whole state)."""
        wanted: set[str] = set()
        for e in job.analysis.out[job.node_id]:
            for expr in (e.condition, e.transform):
                if expr:
                    wanted |= scope_keys(expr)
        if not wanted:
            return {}
        scope = await job.ctx.get_many(sorted(wanted))
        for op in deltas:
            if op.key in wanted:
                if op.op == "set":
                    scope[op.key] = op.value
                else:
                    scope.pop(op.key, None)
        scope[K.output(job.node_id)] = result.output
        return scope

    @staticmethod
    def _signals(
        analysis: GraphAnalysis, node_id: str, generation: int, chosen: list[Edge]
    ) -> Iterable[tuple[str, int, Edge | None]]:
        """(successor, its generation, the chosen edge or None) per forward successor."""
        by_target: dict[str, Edge] = {}
        for e in chosen:
            by_target.setdefault(e.target, e)
        seen: set[str] = set()
        for e in analysis.out[node_id]:
            if e.kind != "forward" or e.target in seen:
                continue
            seen.add(e.target)
            yield e.target, (generation if e.intra else 1), by_target.get(e.target)

    async def _follow_up(
        self,
        job: _Job,
        generation: int,
        *,
        redrive: bool,
        decision: Mapping[str, Any] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        """Everything after a resolution commit; safe to repeat any number of times."""
        analysis = job.analysis
        node_id = job.node_id
        if decision is None:
            decision = await job.ctx.get(K.decision(node_id, generation))
            if decision is None:
                return
        if decision.get("failed"):
            # The activation resolved as a failure (successors were poisoned with it,
            # never signalled): it fails the run, once (the final-status claim).
            await self._finalize(job.run_id, "failed", job.ctx, analysis, errors, owner=node_id)
        else:
            await self._signal_all(job, generation, decision, redrive=redrive)
        await self.coordination_store.set_if_not_exist(
            K.followed_up(self.key_prefix, job.run_id, node_id, generation),
            "1",
            self.dedupe_window_seconds,
        )

    async def _signal_all(
        self, job: _Job, generation: int, decision: Mapping[str, Any], *, redrive: bool
    ) -> None:
        """Signal every forward successor, the loop latch and the end counter."""
        analysis = job.analysis
        node_id = job.node_id
        chosen = [e for e in analysis.out[node_id] if e.index in set(decision["chosen"])]
        handed = {int(k): v for k, v in (decision.get("handed") or {}).items()}
        ready: list[str] = []  # successors to enqueue, sent together
        for target, gen, taken in self._signals(analysis, node_id, generation, chosen):
            await self._signal(
                job, target, gen, node_id, taken, handed, redrive=redrive, ready=ready
            )
        if ready:
            await self._enqueue(job.run_id, job.blueprint, *ready)
        loop = analysis.tail_of_loop.get(node_id)
        if loop is not None:
            await self._latch(job, loop, generation)
        if node_id in analysis.sinks:
            await self._end(job)

    async def _signal(
        self,
        job: _Job,
        target: str,
        gen: int,
        source: str,
        taken: Edge | None,
        handed: Mapping[int, Any],
        *,
        redrive: bool,
        ready: list[str] | None = None,
    ) -> None:
        """Signal ``target`` that ``source`` resolved: enqueue it (or add it to
        ``ready``, enqueued by the caller) when it waits for ``source`` alone, else
        count the signal on its join and activate it when the join is complete."""
        analysis = job.analysis
        if not analysis.is_join(target, gen):
            # The activation record was committed with the source's resolution.
            if redrive:
                state = await job.ctx.get_many([K.resolved(target), K.activation(target, gen)])
                if int(state.get(K.resolved(target), 0)) >= gen:
                    return
                if K.activation(target, gen) not in state and not await self._write_record(
                    job, target, gen, _record(source, taken, handed)
                ):
                    return
            if ready is None:
                await self._enqueue(job.run_id, job.blueprint, target)
            else:
                ready.append(target)
            return
        required = analysis.required(target, gen)
        strategy = analysis.nodes[target].join_strategy
        prefix = self.key_prefix
        if strategy == "any" and taken is not None:
            fired_key = K.any_fired(prefix, job.run_id, target, gen)
            won = await self.coordination_store.set_if_not_exist(
                fired_key, source, self.state_ttl_seconds
            )
            if won or await self.coordination_store.get(fired_key) == source:
                await self._activate(job, target, gen, _record(source, taken, handed))
        count = await self.coordination_store.increment(
            K.join_counter(prefix, job.run_id, target, gen), self.state_ttl_seconds
        )
        if count < len(required):
            return
        # Enough signals: check every required predecessor really resolved (a
        # redelivered signal may have counted twice) and decide.
        decisions = await self._decisions_for(job, target, gen, required)
        if decisions is None:
            return
        inputs: dict[str, Any] = {}
        for pred, (dec, edge_idx) in decisions.items():
            if edge_idx is not None:
                item = (dec.get("handed") or {}).get(str(edge_idx), _REF)
                inputs[pred] = {"ref": K.output(pred)} if item == _REF else {"value": item}
        if strategy == "any":
            if not inputs:
                await self._activate(job, target, gen, {"skip": True})
        else:
            await self._activate(
                job, target, gen, {"skip": not inputs, "inputs": inputs, "gathered": True}
            )

    async def _decisions_for(
        self, job: _Job, target: str, gen: int, required: tuple[str, ...]
    ) -> dict[str, tuple[dict[str, Any], int | None]] | None:
        """Each required predecessor's decision and the edge it chose to ``target``, or
        None if one has not resolved yet."""
        analysis = job.analysis
        keys: dict[str, str] = {}
        exit_loops: dict[str, Loop] = {}
        for pred in required:
            edge = next(e for e in analysis.out[pred] if e.target == target and e.kind != "back")
            if edge.kind == "exit":
                exit_loops[pred] = analysis.loop_of[pred]
            else:
                keys[pred] = K.decision(pred, gen if edge.intra else 1)
        if exit_loops:
            exits = await job.ctx.get_many([K.loop_exit(lp.index) for lp in exit_loops.values()])
            for pred, lp in exit_loops.items():
                iteration = exits.get(K.loop_exit(lp.index))
                if iteration is None:
                    return None
                keys[pred] = K.decision(pred, int(iteration))
        found = await job.ctx.get_many(list(keys.values()))
        result: dict[str, tuple[dict[str, Any], int | None]] = {}
        for pred, key in keys.items():
            dec = found.get(key)
            if dec is None or dec.get("failed"):
                return None
            chosen = set(dec["chosen"])
            idx = next(
                (e.index for e in analysis.out[pred] if e.target == target and e.index in chosen),
                None,
            )
            result[pred] = (dec, idx)
        return result

    async def _activate(self, job: _Job, target: str, gen: int, record: dict[str, Any]) -> None:
        """Write an activation record (same value every time: idempotent) and enqueue."""
        state = await job.ctx.get_many([K.resolved(target), K.activation(target, gen)])
        if int(state.get(K.resolved(target), 0)) >= gen:
            return
        if K.activation(target, gen) not in state and not await self._write_record(
            job, target, gen, record
        ):
            return
        await self._enqueue(job.run_id, job.blueprint, target)

    async def _write_record(self, job: _Job, target: str, gen: int, record: dict[str, Any]) -> bool:
        """Write ``target``'s activation record for ``gen``, guarded on it being absent
        (an activation record never changes once written: the first writer's stands)
        and the run not ended. False when the run failed instead: a record past the
        store's state limit can never be written, and retrying would only repeat that."""
        key = K.activation(target, gen)
        try:
            await job.ctx.patch(
                [PatchOperation("set", key, record)], guard={key: None, K.ENDED: None}
            )
        except StateLimitError as exc:
            err = {
                "nodeId": target,
                "message": f"the activation record of {target!r} (activation {gen}) "
                f"exceeds the state limit: {exc}",
                "type": type(exc).__name__,
            }
            self.logger.info("run %s: %s", job.run_id, err["message"])
            await job.ctx.patch(
                [PatchOperation("set", K.error(target), err)], guard={K.ENDED: None}
            )
            await self._finalize(job.run_id, "failed", job.ctx, job.analysis, [err], owner=target)
            return False
        return True

    async def _latch(self, job: _Job, loop: Loop, iteration: int) -> None:
        count = await self.coordination_store.increment(
            K.latch_counter(self.key_prefix, job.run_id, loop.index, iteration),
            self.state_ttl_seconds,
        )
        if count < len(loop.tails):
            return
        found = await job.ctx.get_many([K.decision(t, iteration) for t in loop.tails])
        if len(found) < len(loop.tails) or any(d.get("failed") for d in found.values()):
            return
        analysis = job.analysis
        back: dict[str, Any] = {}
        for t in loop.tails:
            dec = found[K.decision(t, iteration)]
            for e in analysis.out[t]:
                if e.kind == "back" and e.index in set(dec["chosen"]):
                    item = (dec.get("handed") or {}).get(str(e.index), _REF)
                    back[t] = {"ref": K.output(t)} if item == _REF else {"value": item}
        if back:
            await self._activate(job, loop.head, iteration + 1, {"skip": False, "inputs": back})
            return
        exit_key = K.loop_exit(loop.index)
        if not await job.ctx.patch(
            [PatchOperation("set", exit_key, iteration)], guard={exit_key: None}
        ):
            stored = await job.ctx.get(exit_key)
            if stored != iteration:  # the loop stopped in another iteration: not ours
                return
        for t in loop.tails:
            dec = found[K.decision(t, iteration)]
            chosen = set(dec["chosen"])
            handed = {int(k): v for k, v in (dec.get("handed") or {}).items()}
            seen: set[str] = set()
            for e in analysis.out[t]:
                if e.kind != "exit" or e.target in seen:
                    continue
                seen.add(e.target)
                taken = next(
                    (x for x in analysis.out[t] if x.target == e.target and x.index in chosen), None
                )
                await self._signal(job, e.target, 1, t, taken, handed, redrive=True)

    async def _end(self, job: _Job) -> None:
        analysis = job.analysis
        count = await self.coordination_store.increment(
            K.end_counter(self.key_prefix, job.run_id), self.state_ttl_seconds
        )
        if count < len(analysis.sinks):
            return
        found = await job.ctx.get_many(
            [*(K.resolved(s) for s in analysis.sinks), *(K.error(s) for s in analysis.sinks)]
        )
        # A sink that failed (or was poisoned) resolved too, but the run fails instead.
        if len(found) != len(analysis.sinks) or any(k.startswith(K.error("")) for k in found):
            return
        await self._finalize(job.run_id, "completed", job.ctx, analysis)

    async def _fail(self, job: _Job, generation: int, exc: NodeExecutionError) -> None:
        """A node failed for good: resolve the activation as a failure (its error, pills
        for its successors, ``n.X = g`` and a decision saying it failed, in one patch
        guarded like a commit), then fail the run once. A refused record means another
        delivery resolved the activation first (or the run ended): this failure is
        stale and changes nothing."""
        self.logger.info("run %s: node %s failed: %s", job.run_id, job.node_id, exc)
        await emit(
            self.event_bus, FlowEvent("node:error", job.run_id, job.node_id, {"error": str(exc)})
        )
        err = {
            "nodeId": job.node_id,
            "message": str(exc),
            "type": type(exc.__cause__ or exc).__name__,
        }
        ops = [PatchOperation("set", K.error(job.node_id), err)]
        for target, _gen, _taken in self._signals(job.analysis, job.node_id, generation, []):
            pill = "cancelled" if job.analysis.nodes[target].join_strategy == "any" else "poisoned"
            ops.append(
                PatchOperation(
                    "set",
                    K.error(target),
                    {"nodeId": target, "message": f"{pill} by {job.node_id!r}", "type": pill},
                )
            )
        decision = {"skip": False, "chosen": [], "handed": {}, "failed": True}
        ops.append(PatchOperation("set", K.decision(job.node_id, generation), decision))
        ops.append(PatchOperation("set", K.resolved(job.node_id), generation))
        if not await job.ctx.patch(ops, guard=_fence(job.node_id, generation)):
            await self._refused(job, generation)
            return
        await self._follow_up(job, generation, redrive=False, decision=decision, errors=[err])

    async def _finalize(
        self,
        run_id: str,
        status: str,
        ctx: AsyncContext,
        analysis: GraphAnalysis,
        errors: list[dict[str, Any]] | None = None,
        *,
        owner: str = "",
    ) -> None:
        """Exactly one final status per run: the first ``set_if_not_exist`` wins; the
        winner (or its redelivery) records and publishes it, then tidies up.

        The claim is ``status`` or ``status:owner``: a failure claims it for the
        failing node, so a second node failing at the same time (same status, other
        errors) loses and publishes nothing; a completion has no owner (every
        finalizer of a completed run publishes the same result)."""
        final_key = K.final(self.key_prefix, run_id)
        claim = f"{status}:{owner}" if owner else status
        won = await self.coordination_store.set_if_not_exist(
            final_key, claim, self.state_ttl_seconds
        )
        if not won and await self.coordination_store.get(final_key) != claim:
            return
        if errors is None and status == "failed":
            found = await ctx.get_many([K.STATUS, K.error(owner)] if owner else [K.STATUS])
            recorded = found.get(K.error(owner)) if owner else None
            record = found.get(K.STATUS) or {}
            errors = [recorded] if recorded is not None else list(record.get("errors", []))
        elif errors is None and status == "cancelled":
            errors = [{"nodeId": None, "message": owner or "cancelled", "type": "cancelled"}]
        errors = errors or []
        if status == "cancelled":
            # The run did not end by itself: fence it before reading what to publish, so
            # nothing commits after the published snapshot (every commit is guarded on
            # ``end`` absent).
            await ctx.patch([PatchOperation("set", K.ENDED, status)])
        result = FinalResult(run_id, status, _user_view(await ctx.to_dict()), errors)
        await self.publish_final_result(run_id, result)
        await self._tidy(run_id, ctx, analysis)
        # Recorded last: a job (or reconcile) that finds the run final in its context
        # drops it, so a crash before this line (while publishing or tidying) must
        # leave the run looking unfinished for its redelivery to finish the job.
        await ctx.patch(
            [
                PatchOperation("set", K.STATUS, {"status": status, "errors": errors}),
                PatchOperation("set", K.ENDED, status),
            ]
        )
        await emit(
            self.event_bus,
            FlowEvent("workflow:finish", run_id, None, {"status": status, "errors": errors}),
        )

    async def _tidy(self, run_id: str, ctx: AsyncContext, analysis: GraphAnalysis) -> None:
        """Delete the run's counters (leases and follow-up marks expire by themselves)."""
        prefix = self.key_prefix
        joins = [
            n
            for n in analysis.nodes
            if len(analysis.preds_first[n]) > 1 or len(analysis.preds_loop[n]) > 1
        ]
        tails = [lp.tails[0] for lp in analysis.loops.values()]
        counts = await ctx.get_many([K.resolved(n) for n in {*joins, *tails}])
        doomed = [K.end_counter(prefix, run_id)]
        for n in joins:
            for g in range(1, int(counts.get(K.resolved(n), 0)) + 2):
                doomed.append(K.join_counter(prefix, run_id, n, g))
                doomed.append(K.any_fired(prefix, run_id, n, g))
        for lp in analysis.loops.values():
            for i in range(1, int(counts.get(K.resolved(lp.tails[0]), 0)) + 2):
                doomed.append(K.latch_counter(prefix, run_id, lp.index, i))
        for key in doomed:
            await self.coordination_store.delete(key)

    async def _enqueue(self, run_id: str, blueprint: WorkflowBlueprint, *node_ids: str) -> None:
        jobs = [JobPayload(run_id=run_id, blueprint_id=blueprint.id, node_id=n) for n in node_ids]
        if len(jobs) == 1:
            await self.enqueue_job(jobs[0])
        else:
            await self.enqueue_jobs(jobs)
        if self.event_bus is not None:
            for node_id in node_ids:
                await emit(self.event_bus, FlowEvent("job:enqueued", run_id, node_id))


_REF = "__ref__"


def _fence(node_id: str, generation: int) -> dict[str, int | str | None]:
    """The guard of every write that resolves activation ``generation`` of a node: it
    is still pending (``n.X == g - 1``; absent for the first) and the run not ended.
    Two deliveries of one activation (a stalled worker and its replacement, a late
    duplicate, a resume and a redelivered wait) can both try; exactly one applies."""
    return {
        K.resolved(node_id): generation - 1 if generation > 1 else None,
        K.ENDED: None,
    }


def _fingerprint(blueprint: WorkflowBlueprint, initial: Mapping[str, Any]) -> str:
    """What identifies a start request: blueprint, version and initial context."""
    try:
        text = json.dumps(
            [blueprint.id, blueprint.version, initial],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"initial context is not JSON-serializable: {exc}") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def _record(source: str, taken: Edge | None, handed: Mapping[int, Any]) -> dict[str, Any]:
    """The activation record a single predecessor writes for its successor."""
    if taken is None:
        return {"skip": True}
    item = handed.get(taken.index, _REF)
    return {
        "skip": False,
        "inputs": {source: {"ref": K.output(source)} if item == _REF else {"value": item}},
    }


def _has_any_join(analysis: GraphAnalysis, node_id: str) -> bool:
    """Whether the loop around ``node_id`` has an ``any`` join (see ``_handover``)."""
    loop = analysis.loop_of.get(node_id)
    return loop is not None and any(
        analysis.nodes[n].join_strategy == "any" and len(analysis.preds_loop[n]) > 1
        for n in loop.nodes
    )


def _claimed_status(claim: str | None) -> str | None:
    """The status in a final-status claim (``status`` or ``status:owner``)."""
    return None if claim is None else claim.partition(":")[0]


def _user_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run's context without the protocol's reserved keys."""
    return {k: v for k, v in state.items() if not K.is_reserved(k)}


@dataclass(slots=True)
class _Lease:
    """The activation's lease as this worker knows it: ``held_at`` is the event loop
    time at which it was last confirmed (a request sent then succeeded)."""

    key: str
    holder: str
    held_at: float
    lost: bool = False


class _Heartbeat:
    """Calls ``beat`` every ``interval`` seconds until stopped (a job's lease extension).

    A timer rather than a task: most jobs end before the first beat, and then the
    heartbeat has cost one timer handle instead of a task started and cancelled."""

    __slots__ = ("_beat", "_interval", "_running", "_stopped", "_timer")

    def __init__(self, beat: Callable[[], Awaitable[None]], interval: float) -> None:
        self._beat = beat
        self._interval = interval
        self._running: asyncio.Future[None] | None = None
        self._stopped = False
        self._timer = asyncio.get_running_loop().call_later(interval, self._fire)

    def _fire(self) -> None:
        self._running = asyncio.ensure_future(self._run_beat())

    async def _run_beat(self) -> None:
        await self._beat()
        if not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._fire)

    async def stop(self) -> None:
        self._stopped = True
        self._timer.cancel()
        beat = self._running
        if beat is not None and not beat.done():
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat


def _now() -> float:
    """Monotonic time on the running loop's clock (a simulation's virtual clock)."""
    return asyncio.get_running_loop().time()


@dataclass(slots=True)
class _Job:
    run_id: str
    blueprint: WorkflowBlueprint
    analysis: GraphAnalysis
    node_id: str
    ctx: AsyncContext
    lease: _Lease | None = None
    task: asyncio.Task[Any] | None = None
    """The task handling the job (cancelled at its next await if the run ends)."""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    """The node's ``NodeContext.cancelled``: set when the run ended under it."""
    executing: bool = False
    stopped: bool = False
