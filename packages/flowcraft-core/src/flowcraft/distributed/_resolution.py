"""The resolution protocol: commits, follow-ups, joins, loops, failures and the final status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from flowcraft._analysis import Edge, GraphAnalysis, Loop
from flowcraft._traversal import route
from flowcraft.context import AsyncContext, Guard, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed._core import (
    _AdapterCore,
    _Job,
    _user_view,
)
from flowcraft.distributed._scope import scope_keys
from flowcraft.distributed.coordination import delete_keys
from flowcraft.distributed.results import FinalResult
from flowcraft.errors import (
    NodeExecutionError,
    StateLimitError,
    TimerPending,
)
from flowcraft.events import FlowEvent, emit
from flowcraft.node import NodeResult

logger = logging.getLogger("flowcraft.distributed")


class Resolution(_AdapterCore):
    """Commit one resolution atomically and do everything after it: joins, loops, the
    end of a run, failures and the one final status (DISTRIBUTED.md, steps 6-7)."""

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
        evaluated: list[tuple[Edge, bool]] | None = [] if self.event_bus is not None else None
        if result is not None:
            scope = await self._scope(job, result, deltas)
            chosen = route(analysis, node_id, result, scope, self.runtime.evaluator, evaluated)
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
            # The same events as in memory: each committed write, each edge condition.
            await self.runtime.emit_commit(
                job.run_id,
                node_id,
                list(deltas),
                evaluated or [],
                bus=self.event_bus,
                activation=generation,
            )
            if result is None:
                event = FlowEvent("node:skipped", job.run_id, node_id, {"activation": generation})
            else:
                event = FlowEvent(
                    "node:finish",
                    job.run_id,
                    node_id,
                    {"activation": generation, "output": result.output, "action": result.action},
                )
            await emit(self.event_bus, event)
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
        return self.runtime.apply_edge_transform(edge, output, scope)

    async def _scope(
        self, job: _Job, result: NodeResult, deltas: list[PatchOperation]
    ) -> dict[str, Any]:
        """The context keys this node's edge expressions read (not the whole state)."""
        wanted: set[str] = set()
        for e in job.analysis.out[job.node_id]:
            for expr in (e.condition, e.transform):
                if expr:
                    wanted |= scope_keys(expr)
            if e.transform and e.target_inputs:
                wanted |= scope_keys(e.target_inputs) | {e.target_inputs}
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
        await self.mark_followed_up(job.run_id, node_id, generation)

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
        if loop.terminal:  # no exit edge: the loop's stop is one of the run's ends
            await self._end(job)
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
        ends = len(analysis.sinks) + len(analysis.terminal_loops)
        if count < ends:
            return
        found = await job.ctx.get_many(
            [
                *(K.resolved(s) for s in analysis.sinks),
                *(K.loop_exit(lp.index) for lp in analysis.terminal_loops),
                *(K.error(s) for s in analysis.sinks),
            ]
        )
        # A sink that failed (or was poisoned) resolved too, but the run fails instead.
        if len(found) != ends or any(k.startswith(K.error("")) for k in found):
            return
        await self._finalize(job.run_id, "completed", job.ctx, analysis)

    async def _fail(self, job: _Job, generation: int, exc: NodeExecutionError) -> None:
        """A node failed for good: resolve the activation as a failure (its error, pills
        for its successors, ``n.X = g`` and a decision saying it failed, in one patch
        guarded like a commit), then fail the run once. A refused record means another
        delivery resolved the activation first (or the run ended): this failure is
        stale and changes nothing."""
        self.logger.info("run %s: node %s failed: %s", job.run_id, job.node_id, exc)
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
        # After the record applied: a stale failure refused above is no node error.
        await emit(
            self.event_bus,
            FlowEvent(
                "node:error",
                job.run_id,
                job.node_id,
                {"error": str(exc), "activation": generation},
            ),
        )
        await self._follow_up(job, generation, redrive=False, decision=decision, errors=[err])

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
        state = await ctx.to_dict()
        result = FinalResult(run_id, status, _user_view(state), errors)
        await self.publish_final_result(run_id, result)
        await self._tidy(run_id, state, analysis)
        # Emitted before the status is recorded: a crash between the two redelivers
        # the job, which finalizes (and emits) again; after the record nothing would
        # (a history keeps one ``workflow:finish`` per status).
        await emit(
            self.event_bus,
            FlowEvent(
                "workflow:finish",
                run_id,
                None,
                # the blueprint too: a worker's run history never sees the client's start
                {"status": status, "errors": errors, "blueprintId": analysis.blueprint.id},
            ),
        )
        # Recorded last: a job (or reconcile) that finds the run final in its context
        # drops it, so a crash before this line (while publishing or tidying) must
        # leave the run looking unfinished for its redelivery to finish the job.
        await ctx.patch(
            [
                PatchOperation("set", K.STATUS, {"status": status, "errors": errors}),
                PatchOperation("set", K.ENDED, status),
            ]
        )

    # ------------------------------------------------------------ timers and waits

    def _timer_pending(self, job: _Job, what: str, due: float) -> None:
        """Hand the job back until ``due`` (epoch seconds): released for the time left,
        at most ``max_delay_seconds`` (a wake-up before the due time sleeps again). A
        queue that cannot delay (0) acks it: the reconciler enqueues it when due."""
        left = max(0.0, due - self.clock())
        limit = self.max_delay_seconds
        if limit is not None and limit <= 0:
            return
        raise TimerPending(
            f"{what} of {job.node_id!r} in run {job.run_id!r} is due in {left:.3f} s",
            delay_seconds=left if limit is None else min(left, limit),
        )

    async def _resolve_wait(
        self,
        job: _Job,
        generation: int,
        result: NodeResult,
        *,
        fingerprint: str,
        timer: Mapping[str, Any] | None,
        event: FlowEvent,
    ) -> bool:
        """Resolve a paused wait (a resume, a signal or its timeout): one commit guarded
        on the wait still paused at ``generation``, so of a resume, signals and the
        timeout racing each other exactly one applies. It records what resolved it
        (``sig.X``: a repeated signal is recognised). The token's claim stays (it expires
        with the run's state): a repeat by token must still find the run."""
        node_id = job.node_id
        ops = [
            PatchOperation("delete", K.waiting(node_id)),
            PatchOperation("set", K.STATUS, {"status": "running", "errors": []}),
            PatchOperation("set", K.signalled(node_id), {"g": generation, "fp": fingerprint}),
        ]
        if timer is not None:
            ops.append(PatchOperation("delete", K.timer(node_id)))
        return await self._commit(
            job,
            generation,
            result,
            [],
            protocol_ops=ops,
            guard={K.waiting(node_id): generation},
            on_commit=lambda: emit(self.event_bus, event),
        )

    async def _tidy(self, run_id: str, state: Mapping[str, Any], analysis: GraphAnalysis) -> None:
        """Delete the run's counters (leases and follow-up marks expire by themselves),
        in one call where the store can. ``state``: the ended run's context, read once
        for the published result (nothing commits after the end)."""
        prefix = self.key_prefix
        joins = [
            n
            for n in analysis.nodes
            if len(analysis.preds_first[n]) > 1 or len(analysis.preds_loop[n]) > 1
        ]
        tails = [lp.tails[0] for lp in analysis.loops.values()]
        counts = {k: state[k] for k in (K.resolved(n) for n in {*joins, *tails}) if k in state}
        doomed = [K.end_counter(prefix, run_id)]
        for n in joins:
            for g in range(1, int(counts.get(K.resolved(n), 0)) + 2):
                doomed.append(K.join_counter(prefix, run_id, n, g))
                doomed.append(K.any_fired(prefix, run_id, n, g))
        for lp in analysis.loops.values():
            for i in range(1, int(counts.get(K.resolved(lp.tails[0]), 0)) + 2):
                doomed.append(K.latch_counter(prefix, run_id, lp.index, i))
        await delete_keys(self.coordination_store, doomed)


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
