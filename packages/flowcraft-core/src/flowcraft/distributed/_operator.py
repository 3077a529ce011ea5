"""The operator API: every call is idempotent and guarded in the store."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Mapping
from typing import Any

from flowcraft._analysis import analyse
from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.context import PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed._core import (
    FINAL_STATUSES,
    _AdapterCore,
    _claimed_status,
    _Job,
    _user_view,
)
from flowcraft.distributed._resolution import Resolution
from flowcraft.distributed.results import FinalResult, RunStatusInfo
from flowcraft.errors import (
    FlowcraftError,
    RunConflictError,
    SerializationError,
)
from flowcraft.events import FlowEvent, emit
from flowcraft.node import NodeResult

logger = logging.getLogger("flowcraft.distributed")


class OperatorAPI(Resolution):
    """What an operator calls: start, status, results, resume, cancel, reconcile."""

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
        other request for an existing ``run_id`` raises :class:`RunConflictError`.
        ``run_origin()`` (the caller's trace context) is kept with the state."""
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
        origin = self.run_origin()
        if origin:
            ops.append(PatchOperation("set", K.ORIGIN, origin))
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
            self.event_bus,
            FlowEvent(
                "workflow:start", run_id, None, {"blueprintId": blueprint.id, "context": initial}
            ),
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
        timers: list[dict[str, Any]] = []
        meta = await ctx.get(K.META)
        if status in ("running", "awaiting") and meta:
            bp = self.runtime.blueprints.get(meta["blueprintId"])
            if bp is not None:
                # a sleeping run is running (its job waits in the queue); a paused
                # event wait is awaiting: both keep their timer in ``t.X``
                keys = [k for n in bp.nodes for k in (K.waiting(n.id), K.timer(n.id))]
                found = await ctx.get_many(keys)
                waiting = sorted(n.id for n in bp.nodes if K.waiting(n.id) in found)
                for n in bp.nodes:
                    timer = found.get(K.timer(n.id))
                    if isinstance(timer, dict):
                        timers.append(
                            {
                                "nodeId": n.id,
                                "kind": "wait" if K.waiting(n.id) in found else "sleep",
                                "until": timer.get("due"),
                                "event": timer.get("event"),
                                "token": timer.get("token"),
                            }
                        )
        return RunStatusInfo(run_id, status, list(record.get("errors", [])), waiting, timers)

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The run's published result, or None while it runs.

        A run whose final status is recorded (the finalizer records it after
        publishing) but whose result is not there (it expired, or the adapter keeps
        none) is built from its state, and published again where results are kept,
        so every adapter answers the same way. A final claim alone is not enough:
        its owner may be publishing right now, with the errors only it knows."""
        published = await self.read_final_result(run_id)
        if published is not None:
            return published
        ctx = self.create_context(run_id)
        record = await ctx.get(K.STATUS)
        if not isinstance(record, dict) or record.get("status") not in FINAL_STATUSES:
            return None
        result = FinalResult(
            run_id,
            record["status"],
            _user_view(await ctx.to_dict()),
            list(record.get("errors", [])),
        )
        if self.results is None and (
            type(self).read_final_result is _AdapterCore.read_final_result
        ):
            return result
        await self.publish_final_result(run_id, result)
        return await self.read_final_result(run_id) or result

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
        if not paused:
            # Never paused, or another resume (or the run's end) came first.
            raise RunConflictError(f"run {run_id!r} has no node waiting to resume")
        if len(paused) > 1:
            raise FlowcraftError(f"run {run_id!r}: several nodes wait ({sorted(paused)}); name one")
        ((waiting_id, generation),) = paused.items()
        timer = await ctx.get(K.timer(waiting_id))
        applied = await self._resolve_wait(
            _Job(run_id, blueprint, analysis, waiting_id, ctx),
            generation,
            NodeResult(output=output, action=action),
            fingerprint="resume",
            timer=timer if timer is not None and timer.get("g") == generation else None,
            event=FlowEvent(
                "workflow:resume",
                run_id,
                waiting_id,
                {"activation": generation, "output": output, "action": action},
            ),
        )
        if not applied:
            raise RunConflictError(
                f"run {run_id!r}: {waiting_id!r} (activation {generation}) was resumed by "
                "another call, or the run ended, meanwhile; this resume was not applied"
            )

    async def signal(self, target: str, event: str, payload: Any = None) -> bool:
        """Deliver the external event ``event`` to the wait that waits for it, in the
        run whose wait holds the correlation token ``target`` or else the run with the
        id ``target``: the wait resolves with ``payload`` as its output.

        Returns True when this call resumed the wait, False when the same signal (same
        event and payload) already did: signals are idempotent, so a sender may repeat
        one until it is accepted. Refused with :class:`RunConflictError`: nothing waits
        for ``event`` (a signal before its wait is refused, not buffered), or another
        signal, a resume or the wait's timeout came first (one commit guarded on the
        wait still paused decides). :class:`FlowcraftError`: no such run or token."""
        store = self.coordination_store
        run_id = await store.get(K.token(self.key_prefix, target))
        by_token = run_id is not None
        run_id = run_id or target
        ctx = self.create_context(run_id)
        meta = await ctx.get(K.META)
        if meta is None:
            raise FlowcraftError(f"no waiting run has the token or id {target!r}")
        blueprint = self.blueprint_for(meta["blueprintId"])
        analysis = analyse(blueprint)
        nodes = list(analysis.nodes)
        found = await ctx.get_many(
            [k for n in nodes for k in (K.waiting(n), K.timer(n), K.signalled(n))]
        )
        fingerprint = signal_fingerprint(event, payload)
        matches: list[tuple[str, int, dict[str, Any]]] = []
        for n in nodes:
            generation = found.get(K.waiting(n))
            timer = found.get(K.timer(n))
            if generation is None or timer is None or timer.get("g") != generation:
                continue
            if timer.get("event") == event and (not by_token or timer.get("token") == target):
                matches.append((n, int(generation), timer))
        if not matches:
            if any((found.get(K.signalled(n)) or {}).get("fp") == fingerprint for n in nodes):
                return False
            raise RunConflictError(
                f"run {run_id!r}: nothing waits for the event {event!r} (a signal before "
                "its wait is refused; the wait may also have been resolved by another "
                "signal, a resume or its timeout)"
            )
        node_id, generation, timer = matches[0]
        job = _Job(run_id, blueprint, analysis, node_id, ctx)
        received = FlowEvent(
            "node:signal",
            run_id,
            node_id,
            {
                "activation": generation,
                "event": event,
                "token": timer.get("token"),
                "payload": payload,
            },
        )
        applied = await self._resolve_wait(
            job,
            generation,
            NodeResult(output=payload),
            fingerprint=fingerprint,
            timer=timer,
            event=received,
        )
        if applied:
            return True
        won = await ctx.get(K.signalled(node_id))
        if won is not None and won.get("g") == generation and won.get("fp") == fingerprint:
            return False
        raise RunConflictError(
            f"run {run_id!r}: the wait {node_id!r} (activation {generation}) was resolved "
            "by another signal, a resume or its timeout, or the run ended; this signal "
            "was not applied"
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
        waits = await ctx.get_many([k for n in analysis.nodes for k in (K.waiting(n), K.timer(n))])
        now = self.clock()
        pending_keys = [
            K.activation(n, int(counts.get(K.resolved(n), 0)) + 1) for n in analysis.nodes
        ]
        pending = await ctx.get_many(pending_keys)
        enqueued = 0
        for n in analysis.nodes:
            resolved = int(counts.get(K.resolved(n), 0))
            timer = waits.get(K.timer(n))
            if timer is not None and timer.get("g") != resolved + 1:
                timer = None
            due = None if timer is None else timer.get("due")
            if K.waiting(n) in waits:
                # Paused: only a wait whose timeout is due needs its job (the timer job
                # was lost, or the queue cannot delay).
                wanted = due is not None and due <= now
            else:
                # A sleep not yet due has its job in the queue, released until then.
                wanted = due is None or due <= now
            if K.activation(n, resolved + 1) in pending and wanted:
                await self._enqueue(run_id, blueprint, n)
                enqueued += 1
            if resolved:
                job.node_id = n
                await self._follow_up(job, resolved, redrive=True)
        return enqueued


def signal_fingerprint(event: str, payload: Any) -> str:
    """What identifies a signal: its event and payload (a repeat is the same signal)."""
    try:
        text = json.dumps(
            [event, payload], sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"a signal's payload is not JSON-serializable: {exc}") from exc
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
        data = text.encode()
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError: a lone surrogate
        raise SerializationError(f"initial context is not JSON-serializable: {exc}") from exc
    return hashlib.sha256(data).hexdigest()
