"""Job admission and execution: reads, the lease and its heartbeat, attempts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flowcraft._analysis import GraphAnalysis, analyse
from flowcraft._executor import Awaiting, Sleeping
from flowcraft.blueprint import NodeDefinition, WorkflowBlueprint
from flowcraft.context import AsyncContext, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed._core import (
    FINAL_STATUSES,
    _claimed_status,
    _Job,
    _Lease,
    _now,
)
from flowcraft.distributed._resolution import Resolution, _fence
from flowcraft.distributed._scope import scope_keys
from flowcraft.distributed.delivery import (
    backoff_seconds,
)
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import (
    ExpressionError,
    NodeExecutionError,
    RetryJob,
    SerializationError,
    StateLimitError,
    UnknownBlueprintError,
    UnknownNodeError,
    VersionMismatchError,
)
from flowcraft.events import FlowEvent, emit, wants
from flowcraft.node import NodeResult

logger = logging.getLogger("flowcraft.distributed")


@dataclass(slots=True)
class Admission:
    """What :meth:`JobHandling.admit` found: ``state``, the first read (keys of
    ``first_read_keys``); ``found``, the second read for the pending activation (None:
    not read, the handler reads it); ``leased``, whether the lease of that activation
    was taken for the job (None: not tried, the handler takes it)."""

    state: dict[str, Any]
    found: dict[str, Any] | None = None
    leased: bool | None = None


class JobHandling(Resolution):
    """A job from arrival to resolution: admission (first reads and the lease), the
    lease's heartbeat, execution and the guarded commit (DISTRIBUTED.md, steps 1-5)."""

    async def handle_job(self, job: JobPayload) -> None:
        """Process one job. Returns normally when the job is done with (ack); raises
        ``RetryJob``/``VersionMismatchError`` to hand it back and bad-input errors to
        dead-letter it (see ``job_disposition``). Runs inside ``job_scope(job)``."""
        async with self.job_scope(job):
            await self._handle_reporting(job)

    async def _handle_reporting(self, job: JobPayload) -> None:
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
        if wants(self.event_bus, "job:processed"):
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
        # The lease's value names this job, not only this worker: two deliveries of one
        # activation may land on the same worker.
        holder = f"{self.worker_id}/{uuid.uuid4().hex[:12]}"
        admission = await self.admit(ctx, payload, blueprint, holder)
        state = admission.state
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
        resolved = int(state.get(K.resolved(node_id), 0))
        job = _Job(payload.run_id, blueprint, analysis, node_id, ctx)
        if status in FINAL_STATUSES:
            if resolved and self.event_bus is not None:
                # The worker that resolved it may have died before its events left it
                # while another path ended the run: emit them from the state (history
                # keeps each once).
                await self._emit_resolved(job, resolved)
            self.logger.debug("run %s is %s; dropping job for %s", payload.run_id, status, node_id)
            return
        generation = resolved + 1
        record_key = K.activation(node_id, generation)
        found = admission.found
        if found is None:
            guess = self.likely_input_keys(analysis, node_id, generation)
            found = await ctx.get_many([record_key, K.waiting(node_id), *guess])
        record = found.get(record_key)
        # Paused: a wait's timer job (due: take the timeout edge; else sleep on), or a
        # duplicate of the paused job.
        paused = record is not None and K.waiting(node_id) in found
        if paused and await self._paused_job(job, generation):
            return
        if record is None or K.waiting(node_id) in found:
            # Already done (a duplicate or a redelivery) or paused. Unless the
            # follow-up is known complete, redo it (idempotent), then ack.
            await emit(
                self.event_bus,
                FlowEvent("job:duplicate", job.run_id, node_id, {"resolved": resolved}),
            )
            if resolved and record is None and self.event_bus is not None:
                await self._emit_resolved(job, resolved)
            if resolved and record is None:
                done = K.followed_up(self.key_prefix, job.run_id, node_id, resolved)
                if await self.coordination_store.get(done) is None:
                    await self._follow_up(job, resolved, redrive=True)
            return
        lease = _Lease(K.lease(self.key_prefix, job.run_id, node_id, generation), holder, _now())
        leased = admission.leased
        if leased is None:
            leased = await self.coordination_store.set_if_not_exist(
                lease.key, lease.holder, self.lease_seconds
            )
        if not leased:
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

    async def _emit_resolved(self, job: _Job, generation: int) -> None:
        """A redelivered job whose activation had resolved: emit that resolution again
        from the run's state (the worker that resolved it may have died before its
        events left it; run history keeps each once). Its context writes are not in
        the state apart from the others', so they are not repeated."""
        node_id = job.node_id
        found = await job.ctx.get_many(
            [K.decision(node_id, generation), K.output(node_id), K.error(node_id)]
        )
        decision = found.get(K.decision(node_id, generation))
        if decision is None:
            return
        data: dict[str, Any] = {"activation": generation, "redelivered": True}
        if decision.get("failed"):
            error = found.get(K.error(node_id)) or {}
            data["error"] = error.get("message", "")
            event = "node:error"
        elif decision.get("skip"):
            event = "node:skipped"
        else:
            data["output"] = found.get(K.output(node_id))
            event = "node:finish"
        await emit(self.event_bus, FlowEvent(event, job.run_id, node_id, data))

    async def admit(
        self, ctx: AsyncContext, payload: JobPayload, blueprint: WorkflowBlueprint, holder: str
    ) -> Admission:
        """A job's first reads, and the lease if the adapter can take it in the same
        step (DISTRIBUTED.md, steps 2-4). Override to do them as one atomic step on the
        server: read ``first_read_keys(node)``; from the resolved count ``n`` there,
        read ``activation(n + 1)``, ``waiting(node)`` and ``likely_input_keys(...)``;
        and, exactly when the run is this blueprint version, not final, and that record
        exists without a wait mark, take ``lease(n + 1)`` for ``holder``
        (``set_if_not_exist`` semantics, ``lease_seconds``). The default reads the first
        keys only and leaves the rest to the handler."""
        return Admission(await ctx.get_many(self.first_read_keys(payload.node_id)))

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
        attempts_key = K.attempts(self.key_prefix, job.run_id, job.node_id, generation)
        if in_process or payload.attempt is not None:
            attempt = payload.attempt or 1  # a queue that counts attempts itself says
        else:
            # The base counts failed attempts per activation, so a delivery handed back
            # for a busy lease or a version never uses one up.
            attempt = int(await self.coordination_store.get(attempts_key) or 0) + 1
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
        if self.event_bus is not None:
            await emit(
                self.event_bus,
                FlowEvent(
                    "node:start",
                    job.run_id,
                    job.node_id,
                    {"input": node_input, "activation": generation, "attempt": attempt},
                ),
            )
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
            await self._failed_attempt(
                job, generation, exc, attempt=attempt, last=last, counted=payload.attempt is None
            )
            return
        finally:
            job.executing = False
        if isinstance(execution.result, Sleeping):
            await self._sleep(job, generation, execution.result, execution.deltas)
            return
        if execution.awaiting:
            await self._pause(job, generation, execution.result)
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
            await self._failed_attempt(
                job, generation, error, attempt=attempt, last=last, counted=payload.attempt is None
            )
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

    async def _pause(self, job: _Job, generation: int, result: NodeResult) -> None:
        """Pause a wait node: ``w.X = g`` (and, for an event wait or one with a timeout,
        its timer record ``t.X`` and its token's claim), guarded like a commit plus the
        mark absent. A wait with a timeout keeps its job as the timer: released until
        the timeout is due (DISTRIBUTED.md, "Timers and signals")."""
        node_id = job.node_id
        ops = [
            PatchOperation("set", K.waiting(node_id), generation),
            PatchOperation("set", K.STATUS, {"status": "awaiting", "errors": []}),
        ]
        timer: dict[str, Any] | None = None
        if isinstance(result, Awaiting) and result.timed:
            due = None
            if result.timeout_ms is not None:
                due = self.clock() + result.timeout_ms / 1000
            timer = {"g": generation, "due": due, "event": result.event, "token": result.token}
            if result.token is not None and not await self._claim_token(job, result.token):
                error = NodeExecutionError(
                    f"wait node {node_id!r}: the token {result.token!r} is held by another "
                    "run's wait; tokens must be unique among waiting runs",
                    node_id=node_id,
                )
                await self._fail(job, generation, error)
                return
            ops.append(PatchOperation("set", K.timer(node_id), timer))
        paused = await job.ctx.patch(
            ops, guard={**_fence(node_id, generation), K.waiting(node_id): None}
        )
        if not paused:
            # Resumed or resolved by another delivery, or the run ended; or a duplicate
            # paused it first (its timer stands: this job may be the timer).
            stored = await job.ctx.get_many([K.waiting(node_id), K.timer(node_id)])
            if stored.get(K.waiting(node_id)) == generation:
                timer = stored.get(K.timer(node_id))
                if timer is not None and timer.get("due") is not None:
                    self._timer_pending(job, "the timeout", float(timer["due"]))
                return
            await self._refused(job, generation)
            return
        data: dict[str, Any] = {"activation": generation}
        if timer is not None:
            data.update(event=timer["event"], token=timer["token"], timeoutAt=timer["due"])
        await emit(self.event_bus, FlowEvent("node:awaiting", job.run_id, node_id, data))
        if timer is not None and timer["due"] is not None:
            await self._release_lease(job)
            self._timer_pending(job, "the timeout", float(timer["due"]))

    async def _claim_token(self, job: _Job, token: str) -> bool:
        """Map ``token`` to this run for ``signal``. A claim of another run is taken
        over once that run no longer waits with the token (its wait resolved, or the
        run ended or is gone). False: a live wait of another run holds it."""
        store = self.coordination_store
        key = K.token(self.key_prefix, token)
        for _ in range(2):
            if await store.set_if_not_exist(key, job.run_id, self.state_ttl_seconds):
                return True
            holder = await store.get(key)
            if holder == job.run_id:
                return True
            if holder is not None and await self._waits_with(holder, token):
                return False
            await store.delete(key)
        return False

    async def _waits_with(self, run_id: str, token: str) -> bool:
        """Whether run ``run_id`` has a wait paused with ``token``."""
        ctx = self.create_context(run_id)
        found = await ctx.get_many([K.META, K.ENDED])
        meta = found.get(K.META)
        if meta is None or K.ENDED in found:
            return False
        blueprint = self.runtime.blueprints.get(meta.get("blueprintId"))
        if blueprint is None:
            return True  # cannot tell: leave the claim alone
        nodes = [n.id for n in blueprint.nodes]
        state = await ctx.get_many([k for n in nodes for k in (K.waiting(n), K.timer(n))])
        return any(
            (state.get(K.timer(n)) or {}).get("token") == token
            and state.get(K.waiting(n)) == (state.get(K.timer(n)) or {}).get("g")
            for n in nodes
        )

    async def _paused_job(self, job: _Job, generation: int) -> bool:
        """A job of a paused wait. Its timeout due: take the ``timeout`` edge (guarded
        like a resume: a signal and the timeout, exactly one wins). Not yet due: hand
        it back until then. False: a wait without a timeout (a duplicate: ack)."""
        timer = await job.ctx.get(K.timer(job.node_id))
        if timer is None or timer.get("g") != generation or timer.get("due") is None:
            return False
        due = float(timer["due"])
        if self.clock() < due:
            self._timer_pending(job, "the timeout", due)
            return True
        event = FlowEvent(
            "node:timeout",
            job.run_id,
            job.node_id,
            {
                "activation": generation,
                "event": timer.get("event"),
                "token": timer.get("token"),
                "timeoutAt": due,
            },
        )
        applied = await self._resolve_wait(
            job,
            generation,
            NodeResult(output=None, action="timeout"),
            fingerprint="timeout",
            timer=timer,
            event=event,
        )
        if not applied:
            await self._refused(job, generation)
        return True

    async def _sleep(
        self, job: _Job, generation: int, result: Sleeping, deltas: list[PatchOperation]
    ) -> None:
        """A durable sleep: the first delivery records the wake-up time (``t.X``, guarded
        like a commit plus the record absent, so every delivery agrees on it) and hands
        the job back until then; the delivery that finds it due commits the node."""
        node_id = job.node_id
        key = K.timer(node_id)
        timer = await job.ctx.get(key)
        if timer is None and result.duration_ms > 0:
            due = self.clock() + result.duration_ms / 1000
            timer = {"g": generation, "due": due, "event": None, "token": None}
            if await job.ctx.patch(
                [PatchOperation("set", key, timer)],
                guard={**_fence(node_id, generation), key: None},
            ):
                await emit(
                    self.event_bus,
                    FlowEvent(
                        "node:sleep",
                        job.run_id,
                        node_id,
                        {"activation": generation, "until": due, "durationMs": result.duration_ms},
                    ),
                )
            else:
                state = await job.ctx.get_many([K.resolved(node_id), K.ENDED, key])
                if K.ENDED in state or int(state.get(K.resolved(node_id), 0)) >= generation:
                    await self._refused(job, generation)
                    return
                timer = state.get(key)  # another delivery recorded it first
        if timer is not None and self.clock() < float(timer["due"]):
            await self._release_lease(job)
            self._timer_pending(job, "the sleep", float(timer["due"]))
            return
        ops = [] if timer is None else [PatchOperation("delete", key)]
        until = None if timer is None else timer["due"]
        woke = FlowEvent(
            "node:wake", job.run_id, node_id, {"activation": generation, "until": until}
        )
        committed = await self._commit(
            job,
            generation,
            NodeResult(output=result.output),
            deltas,
            protocol_ops=ops,
            on_commit=lambda: emit(self.event_bus, woke),
        )
        if not committed:
            await self._refused(job, generation)

    async def _failed_attempt(
        self,
        job: _Job,
        generation: int,
        exc: NodeExecutionError,
        *,
        attempt: int,
        last: bool,
        counted: bool,
    ) -> None:
        """An attempt failed: hand the job back for the queue's next attempt after the
        node's backoff (``counted``: the base numbers the attempts), or, after the last
        one, fail the node."""
        if not last:
            # This attempt is over: free the activation for the next delivery (else
            # it waits out the lease, and each lease-busy delivery burns an attempt).
            await self._release_lease(job)
            if counted:
                await self.coordination_store.increment(
                    K.attempts(self.key_prefix, job.run_id, job.node_id, generation),
                    self.state_ttl_seconds,
                )
            node = job.analysis.nodes[job.node_id]
            raise RetryJob(
                f"node {job.node_id!r} attempt {attempt} failed: {exc}; the queue will retry",
                delay_seconds=backoff_seconds(node, attempt),
            ) from exc
        await self._fail(job, generation, exc)

    async def _input(
        self, job: _Job, node: NodeDefinition, record: Mapping[str, Any], found: Mapping[str, Any]
    ) -> Any:
        spec = node.inputs
        transformed = job.analysis.transformed_from.get(job.node_id, frozenset())
        if spec is not None and not transformed:
            return self.runtime.resolve_input(node, {}, await _inputs_scope(job, spec))
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
        if spec is not None:
            # An edge transform replaces the declared ``inputs`` (as in memory).
            scope = await _inputs_scope(job, spec)
            return self.runtime.resolve_input(node, handed, scope, transformed=transformed)
        return self.runtime.resolve_input(node, handed, {}, gathered=bool(record.get("gathered")))


async def _inputs_scope(job: _Job, spec: str | Mapping[str, str]) -> dict[str, Any]:
    """The context keys a node's ``inputs`` expressions read."""
    exprs = [spec] if isinstance(spec, str) else list(spec.values())
    wanted = {k for e in exprs for k in (scope_keys(e) | {e})}
    return await job.ctx.get_many(sorted(wanted))


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
