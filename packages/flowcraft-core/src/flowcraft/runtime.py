"""``FlowRuntime``: runs a blueprint in memory, and the single-step API adapters use."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from flowcraft._analysis import Edge, GraphAnalysis, NodePlan, analyse
from flowcraft._builtins import builtins
from flowcraft._executor import Awaiting, NodeExecutor, Sleeping
from flowcraft._traversal import (
    Activation,
    Scope,
    Traversal,
    input_value,
    route,
    transform_input,
)
from flowcraft.blueprint import EdgeDefinition, NodeDefinition, WorkflowBlueprint
from flowcraft.context import Context, InMemoryContext, PatchOperation, TrackingContext
from flowcraft.errors import (
    ExpressionError,
    FlowcraftError,
    NodeExecutionError,
    RunConflictError,
    UnknownBlueprintError,
    UnknownNodeError,
)
from flowcraft.events import FlowEvent, emit
from flowcraft.expressions import SafeEvaluator
from flowcraft.node import NodeContext, NodeImplementation, NodeResult
from flowcraft.serializer import JsonSerializer

if TYPE_CHECKING:
    from flowcraft.context import AsyncContext
    from flowcraft.events import EventBus
    from flowcraft.expressions import Evaluator
    from flowcraft.flow import Flow
    from flowcraft.middleware import Middleware
    from flowcraft.serializer import Serializer

__all__ = [
    "FlowRuntime",
    "ManualRun",
    "NodeError",
    "NodeExecution",
    "RunStatus",
    "RuntimeOptions",
    "WorkflowResult",
]

OUTPUTS_PREFIX = "_outputs."
_MISSING: Any = object()


def _limit(concurrency: int | None) -> asyncio.Semaphore | None:
    if concurrency is None:
        return None
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    return asyncio.Semaphore(concurrency)


class RunStatus(StrEnum):
    COMPLETED = "completed"
    FAILED = "failed"
    AWAITING = "awaiting"
    CANCELLED = "cancelled"
    STALLED = "stalled"


@dataclass(slots=True)
class RuntimeOptions:
    """How a runtime (or a distributed adapter's runtime) is set up."""

    registry: Mapping[str, NodeImplementation] = field(default_factory=dict)
    blueprints: Mapping[str, WorkflowBlueprint] = field(default_factory=dict)
    dependencies: Mapping[str, Any] = field(default_factory=dict)
    logger: logging.Logger | None = None
    event_bus: EventBus | None = None
    evaluator: Evaluator | None = None
    middleware: Sequence[Middleware] = ()
    serializer: Serializer | None = None
    strict: bool = False
    """Check that every output and context value is JSON-serializable when committed."""
    max_inline_sleep_ms: float | None = None
    """In memory, a sleep up to this long waits in the process; a longer one pauses the
    run (``awaiting``, with ``WorkflowResult.wake_at``) until :meth:`FlowRuntime.wake`.
    None: every sleep waits in the process. (Distributed, every sleep is durable.)"""

    @classmethod
    def from_flows(cls, *flows: Flow, **options: Any) -> RuntimeOptions:
        """Options whose registry and blueprints hold these flows: what a distributed
        worker (or a client naming blueprints by id) needs. Other options pass through."""
        registry = dict(options.pop("registry", {}))
        blueprints = dict(options.pop("blueprints", {}))
        seen: set[str] = set()
        for flow in flows:
            blueprint = flow.to_blueprint()
            if blueprint.id in seen:
                raise ValueError(f"two flows have the id {blueprint.id!r}")
            seen.add(blueprint.id)
            registry.update(flow.registry())
            blueprints[blueprint.id] = blueprint
        return cls(registry=registry, blueprints=blueprints, **options)


@dataclass(frozen=True, slots=True)
class NodeError:
    node_id: str | None
    message: str
    type: str


@dataclass(slots=True)
class WorkflowResult:
    """The outcome of ``run``/``resume``. ``state`` is what ``resume`` needs for a paused run."""

    run_id: str
    status: RunStatus
    context: dict[str, Any]
    errors: list[NodeError] = field(default_factory=list)
    awaiting: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None
    sleeping: list[str] = field(default_factory=list)
    """Nodes whose durable sleep paused the run (see ``RuntimeOptions.max_inline_sleep_ms``)."""
    wake_at: float | None = None
    """When the first sleep or wait timeout of a paused run is due (epoch seconds):
    ``FlowRuntime.wake`` continues it then."""

    def output(self, node_id: str) -> Any:
        """The committed output of a node."""
        return self.context.get(OUTPUTS_PREFIX + node_id)


@dataclass(slots=True)
class NodeExecution:
    """One node activation's result and the deltas to commit with it."""

    result: NodeResult
    deltas: list[PatchOperation]
    awaiting: bool = False


class _Run:
    __slots__ = (
        "analysis",
        "async_context",
        "blueprint",
        "cancel",
        "context",
        "done",
        "errors",
        "failed",
        "limit",
        "outstanding",
        "run_id",
        "sleeping",
        "tasks",
        "timers",
        "traversal",
        "waiting",
    )

    def __init__(
        self,
        blueprint: WorkflowBlueprint,
        analysis: GraphAnalysis,
        context: Context,
        run_id: str,
        traversal: Traversal,
        cancel: asyncio.Event,
    ) -> None:
        self.blueprint = blueprint
        self.analysis = analysis
        self.context = context
        self.async_context = InMemoryContext(context)
        self.run_id = run_id
        self.traversal = traversal
        self.cancel = cancel
        self.errors: list[NodeError] = []
        self.waiting: dict[str, Activation] = {}
        self.timers: dict[str, dict[str, Any]] = {}
        """Per waiting node with an event or a timeout: ``{"event", "token", "due"}``."""
        self.sleeping: dict[str, tuple[Activation, float, Any]] = {}
        """Per sleeping node: its activation, when it is due (epoch s), its output."""
        self.tasks: set[asyncio.Task[None]] = set()
        self.outstanding = 0
        self.done = asyncio.Event()
        self.failed = False
        self.limit: asyncio.Semaphore | None = None


class ManualRun:
    """A run driven by hand, one activation at a time (``flowcraft.debug``'s stepper):
    the runtime's own bookkeeping behind a small public surface, so tools need none
    of its private names. Every node is a step of its own (no chain is fused)."""

    _UNBOUNDED = 1 << 30  # a semaphore that never blocks; its presence stops fusing

    def __init__(
        self,
        runtime: FlowRuntime,
        blueprint: WorkflowBlueprint,
        initial_context: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> None:
        analysis = runtime.analysis(blueprint)
        self.runtime = runtime
        self._run = _Run(
            blueprint,
            analysis,
            Context(initial_context),
            run_id or uuid.uuid4().hex,
            Traversal(analysis),
            asyncio.Event(),
        )
        self._run.limit = asyncio.Semaphore(self._UNBOUNDED)

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def start(self) -> list[Activation]:
        """The first activations: every start node, ready."""
        return [Activation(n, 1) for n in self._run.analysis.start_nodes]

    @property
    def context(self) -> Context:
        return self._run.context

    @property
    def traversal(self) -> Traversal:
        return self._run.traversal

    @property
    def waiting(self) -> dict[str, Activation]:
        """Wait nodes that paused, by node id."""
        return self._run.waiting

    @property
    def errors(self) -> list[NodeError]:
        return self._run.errors

    @property
    def failed(self) -> bool:
        return self._run.failed

    async def step(self, activation: Activation) -> list[Activation]:
        """Run (or skip) one ready activation; the activations it made ready. A node
        that fails marks the run failed (see ``errors``) instead of raising."""
        try:
            return await self.runtime._step(self._run, activation)
        except FlowcraftError as exc:
            self.runtime._fail(self._run, activation.node_id, exc)
            return []

    def restore(
        self,
        context: Mapping[str, Any],
        traversal: Mapping[str, Any],
        waiting: Mapping[str, Activation],
        errors: Sequence[NodeError],
        failed: bool,
    ) -> None:
        """Put the run back where a snapshot of these parts says it was."""
        run = self._run
        run.context = Context(context)
        run.async_context = InMemoryContext(run.context)
        run.traversal = Traversal.from_state(run.analysis, traversal)
        run.waiting = dict(waiting)
        run.errors = list(errors)
        run.failed = failed


class FlowRuntime:
    """Runs workflows in this process.

    ``run`` takes a ``Flow``, a ``WorkflowBlueprint``, its JSON dict, or the id of a
    blueprint in ``options.blueprints``.
    """

    def __init__(self, options: RuntimeOptions | None = None, **kwargs: Any) -> None:
        if options is None:
            options = RuntimeOptions(**kwargs)
        elif kwargs:
            raise TypeError("pass either RuntimeOptions or keyword options, not both")
        self.options = options
        self.logger = options.logger or logging.getLogger("flowcraft.runtime")
        self.evaluator: Evaluator = options.evaluator or SafeEvaluator(strict_names=False)
        self.serializer: Serializer = options.serializer or JsonSerializer()
        self.event_bus = options.event_bus
        self.blueprints: dict[str, WorkflowBlueprint] = dict(options.blueprints)
        self.registry: dict[str, NodeImplementation] = {**builtins(self), **options.registry}
        self.executor = NodeExecutor(
            self.registry, middleware=tuple(options.middleware), event_bus=options.event_bus
        )
        self.parked: dict[str, tuple[WorkflowBlueprint, WorkflowResult]] = {}
        """Runs paused at a sleep, an event wait or a wait with a timeout, by run id:
        what :meth:`signal` and :meth:`wake` continue (dropped when they do)."""
        self._tokens: dict[str, str] = {}
        self._signalled: OrderedDict[tuple[str, str], str] = OrderedDict()

    # ---------------------------------------------------------------- lookups

    def blueprint(
        self, target: Flow | WorkflowBlueprint | Mapping[str, Any] | str
    ) -> WorkflowBlueprint:
        """Resolve what ``run`` accepts to a checked blueprint (registering a Flow's callables)."""
        from flowcraft.flow import Flow

        if isinstance(target, Flow):
            self.registry.update(target.registry())
            bp = target.to_blueprint()
            self.blueprints.setdefault(bp.id, bp)
            return bp
        if isinstance(target, WorkflowBlueprint):
            return target
        if isinstance(target, str):
            try:
                return self.blueprints[target]
            except KeyError:
                raise UnknownBlueprintError(f"no blueprint with id {target!r}") from None
        return WorkflowBlueprint.parse(dict(target))

    def analysis(self, blueprint: WorkflowBlueprint) -> GraphAnalysis:
        return analyse(blueprint)

    def check_registry(self, blueprint: WorkflowBlueprint) -> None:
        """Fail before running if a node's ``uses`` has no implementation."""
        if analyse(blueprint).uses <= self.registry.keys():
            return
        missing = [n for n in blueprint.nodes if n.uses not in self.registry]
        if missing:
            names = ", ".join(f"{n.id!r} uses {n.uses!r}" for n in missing)
            raise UnknownNodeError(f"blueprint {blueprint.id!r}: unknown implementation: {names}")

    # ---------------------------------------------------------------- runs

    async def run(
        self,
        target: Flow | WorkflowBlueprint | Mapping[str, Any] | str,
        initial_context: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        cancel: asyncio.Event | None = None,
        concurrency: int | None = None,
        input: Any = None,
    ) -> WorkflowResult:
        """Run to completion (or a pause). ``concurrency`` caps the nodes running at
        once in this run; ``input`` (if not None) is every start node's input."""
        blueprint = self.blueprint(target)
        analysis = self.analysis(blueprint)
        self.check_registry(blueprint)
        run = _Run(
            blueprint,
            analysis,
            Context(initial_context),
            run_id or uuid.uuid4().hex,
            Traversal(analysis),
            cancel or asyncio.Event(),
        )
        if self.event_bus is not None:
            await emit(
                self.event_bus,
                FlowEvent(
                    "workflow:start",
                    run.run_id,
                    None,
                    {"blueprintId": blueprint.id, "context": run.context.to_dict()},
                ),
            )
        self.logger.debug("run %s of %s started", run.run_id, blueprint.id)
        run.limit = _limit(concurrency)
        handed = {} if input is None else {"": input}
        starts = [Activation(n, 1, inputs=dict(handed)) for n in analysis.start_nodes]
        return await self._drive(run, starts, watch_cancel=cancel is not None)

    async def resume(
        self,
        target: Flow | WorkflowBlueprint | Mapping[str, Any] | str,
        paused: WorkflowResult | Mapping[str, Any],
        node_id: str | None = None,
        *,
        output: Any = None,
        action: str | None = None,
        cancel: asyncio.Event | None = None,
        concurrency: int | None = None,
    ) -> WorkflowResult:
        """Continue a run paused at a wait node, giving that node its result."""
        state = paused.state if isinstance(paused, WorkflowResult) else paused
        if not state or "waiting" not in state:
            raise FlowcraftError("nothing to resume: the run is not awaiting")
        blueprint = self.blueprint(target)
        waiting = {n: Activation(n, g, False, dict(i)) for n, g, i in state["waiting"]}
        if node_id is None:
            if len(waiting) != 1:
                raise FlowcraftError(f"several nodes are waiting ({sorted(waiting)}): name one")
            node_id = next(iter(waiting))
        if node_id not in waiting:
            raise FlowcraftError(f"node {node_id!r} is not waiting (waiting: {sorted(waiting)})")
        self._unpark(state["runId"], state)
        run = self._restore(blueprint, state, cancel)
        act = run.waiting.pop(node_id)
        run.timers.pop(node_id, None)
        run.limit = _limit(concurrency)
        await emit(
            self.event_bus,
            FlowEvent(
                "workflow:resume",
                run.run_id,
                node_id,
                {"activation": act.generation, "output": output, "action": action},
            ),
        )
        result = NodeResult(output=output, action=action)
        ready = self._commit(run, act, result, [])
        return await self._drive(run, ready, watch_cancel=cancel is not None)

    def _restore(
        self, blueprint: WorkflowBlueprint, state: Mapping[str, Any], cancel: asyncio.Event | None
    ) -> _Run:
        """A paused run, from its saved state."""
        analysis = self.analysis(blueprint)
        self.check_registry(blueprint)
        run = _Run(
            blueprint,
            analysis,
            Context(state["context"]),
            state["runId"],
            Traversal.from_state(analysis, state["traversal"]),
            cancel or asyncio.Event(),
        )
        run.waiting = {n: Activation(n, g, False, dict(i)) for n, g, i in state["waiting"]}
        run.timers = {n: dict(t) for n, t in (state.get("timers") or {}).items()}
        run.sleeping = {
            n: (Activation(n, g, False, dict(i)), float(due), out)
            for n, g, i, due, out in state.get("sleeping") or []
        }
        return run

    def _unpark(self, run_id: str, state: Mapping[str, Any] | None = None) -> None:
        """Forget a parked run (it is being continued), only if ``state`` is its state."""
        parked = self.parked.get(run_id)
        if parked is None or (state is not None and parked[1].state is not state):
            return
        del self.parked[run_id]
        for token in [t for t, r in self._tokens.items() if r == run_id]:
            del self._tokens[token]

    def _paused_state(
        self, run: str | WorkflowResult | Mapping[str, Any], target: Any
    ) -> tuple[WorkflowBlueprint, dict[str, Any]]:
        if isinstance(run, str):
            parked = self.parked.get(run)
            if parked is None:
                raise RunConflictError(f"run {run!r} is not paused in this runtime")
            blueprint, result = parked
            assert result.state is not None
            return (self.blueprint(target) if target is not None else blueprint), result.state
        state = run.state if isinstance(run, WorkflowResult) else dict(run)
        if not state or "waiting" not in state:
            raise FlowcraftError("the run is not paused")
        blueprint = self.blueprint(target if target is not None else state["blueprintId"])
        return blueprint, state

    async def wake(
        self,
        run: str | WorkflowResult | Mapping[str, Any],
        *,
        target: Flow | WorkflowBlueprint | Mapping[str, Any] | str | None = None,
        wait: bool = True,
        cancel: asyncio.Event | None = None,
    ) -> WorkflowResult:
        """Continue a run paused by a durable sleep or a wait's timeout: every sleep due
        by now resolves (passing its input on) and every due timeout takes its
        ``timeout`` edge. With ``wait``, first sleep until the earliest is due.

        ``run`` is a paused run's id (kept by this runtime), its result or its saved
        ``state`` (then ``target`` names the blueprint if it is not registered)."""
        blueprint, state = self._paused_state(run, target)
        dues = [float(s[3]) for s in state.get("sleeping") or []] + [
            float(t["due"]) for t in (state.get("timers") or {}).values() if t.get("due")
        ]
        if not dues:
            raise FlowcraftError(f"run {state['runId']!r} has no sleep or timeout to wake")
        if wait:
            await asyncio.sleep(max(0.0, min(dues) - time.time()))
            if isinstance(run, str) and (
                run not in self.parked or self.parked[run][1].state is not state
            ):
                raise RunConflictError(f"run {run!r} was continued by another call meanwhile")
        self._unpark(state["runId"], state)
        live = self._restore(blueprint, state, cancel)
        now = time.time()
        ready: list[Activation] = []
        for node_id, (act, due, out) in list(live.sleeping.items()):
            if due <= now:
                del live.sleeping[node_id]
                woke = {"activation": act.generation, "until": due}
                await emit(self.event_bus, FlowEvent("node:wake", live.run_id, node_id, woke))
                ready += await self._resolve_paused(live, act, NodeResult(output=out))
        for node_id, timer in list(live.timers.items()):
            timeout_at = timer.get("due")
            if timeout_at is not None and timeout_at <= now:
                del live.timers[node_id]
                act = live.waiting.pop(node_id)
                await emit(
                    self.event_bus,
                    FlowEvent(
                        "node:timeout",
                        live.run_id,
                        node_id,
                        {
                            "activation": act.generation,
                            "event": timer.get("event"),
                            "token": timer.get("token"),
                            "timeoutAt": timeout_at,
                        },
                    ),
                )
                timed_out = NodeResult(output=None, action="timeout")
                ready += await self._resolve_paused(live, act, timed_out)
        return await self._drive(live, ready, watch_cancel=cancel is not None)

    async def signal(
        self,
        run_or_token: str,
        event: str,
        payload: Any = None,
        *,
        paused: WorkflowResult | Mapping[str, Any] | None = None,
        target: Flow | WorkflowBlueprint | Mapping[str, Any] | str | None = None,
        cancel: asyncio.Event | None = None,
    ) -> WorkflowResult | None:
        """Deliver ``event`` to the wait for it in the run whose wait holds the token
        ``run_or_token`` (or else the run with that id, paused in this runtime, or
        ``paused``, a saved result or state): the wait resolves with ``payload`` as
        its output and the run continues; returns its result.

        None: the same signal (event and payload) already resumed that wait (signals
        are idempotent). :class:`RunConflictError`: nothing waits for ``event`` (a
        signal before its wait is refused, not buffered), or another signal or the
        timeout came first."""
        fingerprint = _signal_fingerprint(event, payload)
        run_id = self._tokens.get(run_or_token, run_or_token)
        by_token = run_or_token in self._tokens
        if paused is not None:
            blueprint, state = self._paused_state(paused, target)
        elif run_id in self.parked:
            blueprint, state = self._paused_state(run_id, target)
        else:
            if self._signalled.get((run_or_token, event)) == fingerprint:
                return None
            raise RunConflictError(
                f"nothing waits for the event {event!r} with the token or run id "
                f"{run_or_token!r} (a signal before its wait is refused)"
            )
        timers = state.get("timers") or {}
        node_id = next(
            (
                n
                for n, t in sorted(timers.items())
                if t.get("event") == event and (not by_token or t.get("token") == run_or_token)
            ),
            None,
        )
        if node_id is None:
            if self._signalled.get((run_or_token, event)) == fingerprint:
                return None
            raise RunConflictError(f"run {state['runId']!r}: nothing waits for the event {event!r}")
        self._unpark(state["runId"], state)
        live = self._restore(blueprint, state, cancel)
        act = live.waiting.pop(node_id)
        timer = live.timers.pop(node_id)
        for key in (live.run_id, timer.get("token")):
            if key:
                self._signalled[(key, event)] = fingerprint
                while len(self._signalled) > 4096:
                    self._signalled.popitem(last=False)
        await emit(
            self.event_bus,
            FlowEvent(
                "node:signal",
                live.run_id,
                node_id,
                {
                    "activation": act.generation,
                    "event": event,
                    "token": timer.get("token"),
                    "payload": payload,
                },
            ),
        )
        ready = await self._resolve_paused(live, act, NodeResult(output=payload))
        return await self._drive(live, ready, watch_cancel=cancel is not None)

    async def _resolve_paused(
        self, run: _Run, act: Activation, result: NodeResult
    ) -> list[Activation]:
        """Commit a sleep, a signalled wait or a timed-out one, with the events of any
        commit (as the distributed base emits them)."""
        if self.event_bus is None:
            return self._commit(run, act, result, [])
        evaluated: list[tuple[Edge, bool]] = []
        ready = self._commit(run, act, result, [], evaluated)
        await self.emit_commit(run.run_id, act.node_id, [], evaluated, activation=act.generation)
        data = {
            "output": result.output,
            "action": result.action,
            "next": [a.node_id for a in ready],
            "activation": act.generation,
        }
        await emit(self.event_bus, FlowEvent("node:finish", run.run_id, act.node_id, data))
        return ready

    async def _drive(
        self, run: _Run, ready: list[Activation], *, watch_cancel: bool = True
    ) -> WorkflowResult:
        if not ready:
            return await self._finish(run)
        if not watch_cancel:
            # Nobody can cancel: run the first activation in this task (a chain
            # never leaves it), the others in their own tasks.
            for act in ready[1:]:
                self._spawn(run, act)
            run.outstanding += 1
            await self._worker(run, ready[0])
            if run.outstanding and not run.failed:
                await run.done.wait()
        else:
            for act in ready:
                self._spawn(run, act)
            cancel_wait = asyncio.ensure_future(run.cancel.wait())
            done_wait = asyncio.ensure_future(run.done.wait())
            try:
                await asyncio.wait({cancel_wait, done_wait}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                cancel_wait.cancel()
                done_wait.cancel()
        if run.tasks and (run.failed or run.cancel.is_set()):
            for task in list(run.tasks):
                task.cancel()
            await asyncio.gather(*run.tasks, return_exceptions=True)
        return await self._finish(run)

    async def _finish(self, run: _Run) -> WorkflowResult:
        if run.failed:
            status = RunStatus.FAILED
        elif run.cancel.is_set():
            status = RunStatus.CANCELLED
        elif run.waiting or run.sleeping:
            status = RunStatus.AWAITING
        elif run.traversal.finished:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.STALLED
        state = None
        # The run is over and owns its context: hand the dict over rather than copy
        # it (a copy of a 100,000-node run's outputs is paid per node).
        context = run.context.data
        if status is RunStatus.AWAITING:
            state = {
                "runId": run.run_id,
                "blueprintId": run.blueprint.id,
                "context": run.context.to_dict(),
                "traversal": run.traversal.to_state(),
                "waiting": [[a.node_id, a.generation, a.inputs] for a in run.waiting.values()],
            }
            if run.timers:
                state["timers"] = run.timers
            if run.sleeping:
                state["sleeping"] = [
                    [a.node_id, a.generation, a.inputs, due, out]
                    for a, due, out in run.sleeping.values()
                ]
        result = WorkflowResult(run.run_id, status, context, run.errors, sorted(run.waiting), state)
        if state is not None and (run.timers or run.sleeping):
            dues = [due for _, due, _ in run.sleeping.values()]
            dues += [t["due"] for t in run.timers.values() if t.get("due") is not None]
            result.sleeping = sorted(run.sleeping)
            result.wake_at = min(dues) if dues else None
            self.parked[run.run_id] = (run.blueprint, result)
            for timer in run.timers.values():
                if timer.get("token"):
                    self._tokens[timer["token"]] = run.run_id
        self.logger.debug("run %s ended %s", run.run_id, status)
        if self.event_bus is not None and status in (RunStatus.AWAITING, RunStatus.STALLED):
            if status is RunStatus.STALLED:
                await emit(self.event_bus, FlowEvent("workflow:stall", run.run_id))
            await emit(
                self.event_bus,
                FlowEvent("workflow:pause", run.run_id, None, {"awaiting": sorted(run.waiting)}),
            )
        await emit(
            self.event_bus,
            FlowEvent(
                "workflow:finish",
                run.run_id,
                None,
                {"status": str(status), "errors": [e.message for e in run.errors]},
            ),
        )
        return result

    def _spawn(self, run: _Run, act: Activation) -> None:
        run.outstanding += 1
        task = asyncio.ensure_future(self._worker(run, act))
        run.tasks.add(task)
        task.add_done_callback(run.tasks.discard)

    async def _worker(self, run: _Run, first: Activation) -> None:
        """Runs activations one after another; a chain never creates a second task."""
        act: Activation | None = first
        try:
            while act is not None and not run.failed and not run.cancel.is_set():
                ready = await self._step(run, act)
                if not ready:
                    break
                act = ready[0]
                for other in ready[1:]:
                    self._spawn(run, other)
        except FlowcraftError as exc:
            self._fail(run, act.node_id if act else None, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in user middleware or an event bus: fail the run
            self.logger.exception("run %s: unexpected error", run.run_id)
            self._fail(run, act.node_id if act else None, exc)
        finally:
            run.outstanding -= 1
            if run.outstanding == 0:
                run.done.set()

    def _fail(self, run: _Run, node_id: str | None, exc: BaseException) -> None:
        run.failed = True
        run.errors.append(NodeError(getattr(exc, "node_id", node_id), str(exc), type(exc).__name__))
        run.done.set()

    async def _step(self, run: _Run, act: Activation) -> list[Activation]:
        node_id = act.node_id
        bus = self.event_bus
        if act.skip:
            if bus is not None:
                await emit(
                    bus,
                    FlowEvent("node:skipped", run.run_id, node_id, {"activation": act.generation}),
                )
            return run.traversal.resolve(node_id, act.generation, None, {})
        plan = run.analysis.plans[node_id]
        if plan.chain_link and bus is None and not self.executor.middleware and run.limit is None:
            impl = plan.impl if plan.impl_registry is self.registry else self._cache_impl(plan)
            if not isinstance(impl, type):
                return await self._run_chain(run, act, plan, impl)
        node = plan.node
        tracking = TrackingContext(run.async_context, run.analysis.node_ids)
        if node.inputs is None and not act.gathered and len(act.inputs) == 1:
            node_input = next(iter(act.inputs.values()))
        else:
            node_input = self.resolve_input(
                node,
                act.inputs,
                run.context.data,
                gathered=act.gathered,
                transformed=run.analysis.transformed_from.get(node_id, ()),
            )
        ctx = NodeContext(
            tracking,
            node_input,
            plan.params,
            self.options.dependencies,
            run.run_id,
            node_id,
            1,
            act.generation,
            run.cancel,
            node,
        )
        if bus is not None:
            await emit(
                bus,
                FlowEvent(
                    "node:start",
                    run.run_id,
                    node_id,
                    {"input": ctx.input, "activation": act.generation, "attempt": 1},
                ),
            )
        try:
            if run.limit is None:
                result = await self.executor.execute(node, ctx, fallback=plan.fallback)
            else:
                async with run.limit:
                    result = await self.executor.execute(node, ctx, fallback=plan.fallback)
        except NodeExecutionError as exc:
            self.logger.info("run %s: node %s failed: %s", run.run_id, node_id, exc)
            if bus is not None:
                await emit(
                    bus,
                    FlowEvent(
                        "node:error",
                        run.run_id,
                        node_id,
                        {"error": str(exc), "activation": act.generation},
                    ),
                )
            raise
        return await self._finish_step(run, act, plan, result, tracking, ctx)

    async def _finish_step(
        self,
        run: _Run,
        act: Activation,
        plan: NodePlan,
        result: NodeResult,
        tracking: TrackingContext,
        ctx: NodeContext,
    ) -> list[Activation]:
        """After a node ran: dynamic nodes, a pause, or the commit and routing."""
        node_id = act.node_id
        bus = self.event_bus
        if result.dynamic_nodes:
            await self.run_dynamic_nodes(result, ctx)
        if isinstance(result, Sleeping):
            limit = self.options.max_inline_sleep_ms
            if limit is None or result.duration_ms <= limit:
                await asyncio.sleep(result.duration_ms / 1000)
                result = NodeResult(output=result.output)
            else:
                due = time.time() + result.duration_ms / 1000
                run.sleeping[node_id] = (act, due, result.output)
                ms = result.duration_ms
                slept = {"activation": act.generation, "until": due, "durationMs": ms}
                await emit(bus, FlowEvent("node:sleep", run.run_id, node_id, slept))
                return []
        if isinstance(result, Awaiting):
            run.waiting[node_id] = act
            data: dict[str, Any] = {"activation": act.generation}
            if result.timed:
                limit_ms = result.timeout_ms
                timeout_at = None if limit_ms is None else time.time() + limit_ms / 1000
                timer = {"event": result.event, "token": result.token, "due": timeout_at}
                run.timers[node_id] = timer
                data.update(event=result.event, token=result.token, timeoutAt=timeout_at)
            if bus is not None:
                await emit(bus, FlowEvent("node:awaiting", run.run_id, node_id, data))
            return []
        deltas = tracking.ops if tracking.dirty else []
        if bus is None:
            ready = self._commit(run, act, result, deltas)
        else:
            evaluated: list[tuple[Edge, bool]] = []
            ready = self._commit(run, act, result, deltas, evaluated)
            await self.emit_commit(
                run.run_id, node_id, deltas, evaluated, activation=act.generation
            )
        if bus is not None:
            await emit(
                bus,
                FlowEvent(
                    "node:finish",
                    run.run_id,
                    node_id,
                    {
                        "output": result.output,
                        "action": result.action,
                        "next": [a.node_id for a in ready],
                        "activation": act.generation,
                    },
                ),
            )
        return ready

    async def emit_commit(
        self,
        run_id: str,
        node_id: str,
        deltas: list[PatchOperation],
        evaluated: list[tuple[Edge, bool]],
        *,
        bus: EventBus | None = None,
        activation: int | None = None,
    ) -> None:
        """``context:change`` per committed write, ``edge:evaluate`` per condition (on
        ``bus``, by default this runtime's; a distributed adapter passes its own). With
        ``activation``, each event names it (run history tells loop iterations apart)."""
        bus = bus if bus is not None else self.event_bus
        extra = {} if activation is None else {"activation": activation}
        for op in deltas:
            await emit(
                bus,
                FlowEvent(
                    "context:change",
                    run_id,
                    node_id,
                    {
                        "key": op.key,
                        "op": op.op,
                        "value": op.value,
                        "sourceNode": node_id,
                        **extra,
                    },
                ),
            )
        for edge, outcome in evaluated:
            await emit(
                bus,
                FlowEvent(
                    "edge:evaluate",
                    run_id,
                    node_id,
                    {
                        "source": edge.source,
                        "target": edge.target,
                        "condition": edge.condition,
                        "result": outcome,
                        **extra,
                    },
                ),
            )

    def _cache_impl(self, plan: NodePlan) -> Any:
        impl = self.executor.implementation(plan.node)
        plan.impl, plan.impl_registry = impl, self.registry
        return impl

    async def _run_chain(
        self, run: _Run, act: Activation, plan: NodePlan, impl: Any
    ) -> list[Activation]:
        """Plain chain links, one after another: one call, one write, then on to the
        next link's plan without a graph-sized lookup or an activation record.
        Anything unusual (a failure, a context write, a dynamic node, a wait) takes
        the ordinary path's rules; the first non-link hands back an activation."""
        inputs = act.inputs
        node_input = (
            next(iter(inputs.values()))
            if len(inputs) == 1 and not act.gathered
            else self.resolve_input(plan.node, inputs, {}, gathered=act.gathered)
        )
        generation = act.generation
        data = run.context.data
        registry = self.registry
        dependencies = self.options.dependencies
        strict = self.options.strict
        call_once = self.executor.call_once
        previous: str | None = None  # the link before this one, when it ran in this loop
        node_ids = run.analysis.node_ids
        while True:
            node_id = plan.node_id
            tracking = TrackingContext(run.async_context, node_ids)
            ctx = NodeContext(
                tracking,
                node_input,
                plan.params,
                dependencies,
                run.run_id,
                node_id,
                1,
                generation,
                run.cancel,
                plan.node,
            )
            try:
                result = await call_once(plan.node, impl, ctx, None)
            except NodeExecutionError as exc:
                self.logger.info("run %s: node %s failed: %s", run.run_id, node_id, exc)
                raise
            if (
                tracking.dirty
                or result.dynamic_nodes
                or isinstance(result, Awaiting | Sleeping)
                or strict
            ):
                if previous is not None:
                    act = Activation(node_id, generation, inputs={previous: node_input})
                return await self._finish_step(run, act, plan, result, tracking, ctx)
            output = result.output
            data[plan.output_key] = output
            if not plan.next_intra:
                generation = 1
            nxt = plan.next_plan
            assert nxt is not None
            if nxt.chain_link and not run.failed and not run.cancel.is_set():
                impl = nxt.impl if nxt.impl_registry is registry else self._cache_impl(nxt)
                if not isinstance(impl, type):
                    plan, node_input, previous = nxt, output, node_id
                    continue
            return [Activation(nxt.node_id, generation, inputs={node_id: output})]

    def _commit(
        self,
        run: _Run,
        act: Activation,
        result: NodeResult,
        deltas: list[PatchOperation],
        evaluated: list[tuple[Edge, bool]] | None = None,
    ) -> list[Activation]:
        node_id = act.node_id
        data = run.context.data
        if self.options.strict:
            self.serializer.dumps(result.output)
            for op in deltas:
                if op.op == "set":
                    self.serializer.dumps(op.value)
        if deltas:
            run.context.apply(deltas)
        data[OUTPUTS_PREFIX + node_id] = result.output
        try:
            chosen = route(run.analysis, node_id, result, data, self.evaluator, evaluated)
            inputs_for = {
                e.index: transform_input(e, result.output, data, self.evaluator) for e in chosen
            }
        except ExpressionError as exc:
            raise NodeExecutionError(str(exc), node_id=node_id, cause=exc) from exc
        return run.traversal.resolve(node_id, act.generation, chosen, inputs_for)

    # ---------------------------------------------------------------- single-step API

    def resolve_input(
        self,
        node: NodeDefinition,
        inputs: Mapping[str, Any],
        scope: Mapping[str, Any],
        *,
        gathered: bool = False,
        transformed: Collection[str] = (),
    ) -> Any:
        """A node's input: if it declares ``inputs``, what an edge transform handed over
        (from a predecessor in ``transformed``), else its ``inputs``; else for an ``all`` join a
        dict of what each choosing predecessor handed over; else that one value.

        An ``inputs`` path ``a`` or ``a.b`` reads node ``a``'s output first, then the
        context key (the TypeScript flowcraft's rule); other expressions are evaluated
        over ``scope``, where node ids name their outputs."""
        spec = node.inputs
        if spec is not None and transformed:
            for pred, value in inputs.items():
                if pred in transformed:
                    return value
        if spec is not None:
            if isinstance(spec, str):
                return self._lookup(node, spec, scope)
            return {k: self._lookup(node, v, scope) for k, v in spec.items()}
        if gathered:
            return dict(inputs)
        if not inputs:
            return None
        return next(iter(inputs.values()))

    def _lookup(self, node: NodeDefinition, expression: str, scope: Mapping[str, Any]) -> Any:
        value = input_value(expression, scope, _MISSING)
        if value is not _MISSING:
            return value
        if expression in scope:
            return scope[expression]
        named = node._named_inputs  # hyphenated node ids spelled out, by the analysis
        try:
            return self.evaluator.evaluate(
                named.get(expression, expression) if named else expression, Scope(scope)
            )
        except ExpressionError as exc:
            raise NodeExecutionError(
                f"node {node.id!r}: input {expression!r} failed: {exc}", node_id=node.id, cause=exc
            ) from exc

    async def run_dynamic_nodes(self, result: NodeResult, ctx: NodeContext) -> None:
        """Run the nodes a result added, concurrently, recording their outputs with the parent's."""
        nodes = result.dynamic_nodes or []
        for n in nodes:
            if n.uses not in self.registry:
                raise NodeExecutionError(
                    f"dynamic node {n.id!r} of {ctx.node_id!r} uses unknown {n.uses!r}",
                    node_id=ctx.node_id,
                )

        async def one(n: NodeDefinition) -> None:
            sub = NodeContext(
                ctx.context,
                result.output,
                n.params or {},
                ctx.dependencies,
                ctx.run_id,
                n.id,
                1,
                ctx.activation,
                ctx.cancelled,
                n,
            )
            out = await self.executor.execute(n, sub)
            await ctx.context.set(OUTPUTS_PREFIX + n.id, out.output)

        await asyncio.gather(*(one(n) for n in nodes))

    async def execute_node(
        self,
        blueprint: WorkflowBlueprint,
        node_id: str,
        context: AsyncContext,
        *,
        run_id: str,
        input: Any = None,
        activation: int = 1,
        attempt: int = 1,
        max_attempts: int | None = None,
        use_fallback: bool = True,
        cancel: asyncio.Event | None = None,
    ) -> NodeExecution:
        """Run one activation without committing anything: the caller commits
        ``result.output`` and ``deltas`` together in one ``patch``."""
        analysis = self.analysis(blueprint)
        node = analysis.node(node_id)
        tracking = TrackingContext(context, analysis.node_ids)
        ctx = NodeContext(
            tracking,
            input,
            node.params or {},
            self.options.dependencies,
            run_id,
            node_id,
            attempt,
            activation,
            cancel or asyncio.Event(),
            node,
        )
        fallback = node.config.fallback if node.config and use_fallback else None
        result = await self.executor.execute(
            node,
            ctx,
            max_attempts=max_attempts,
            fallback=analysis.nodes[fallback] if fallback else None,
        )
        if isinstance(result, Awaiting):
            return NodeExecution(result, [], awaiting=True)
        if result.dynamic_nodes:
            await self.run_dynamic_nodes(result, ctx)
        return NodeExecution(result, tracking.ops)

    def determine_next_nodes(
        self,
        blueprint: WorkflowBlueprint,
        node_id: str,
        result: NodeResult,
        scope: Mapping[str, Any],
    ) -> list[tuple[NodeDefinition, EdgeDefinition]]:
        """The successors a result selects (actions, then conditions), with the edge to each."""
        analysis = self.analysis(blueprint)
        return [
            (analysis.nodes[e.target], e.definition)
            for e in route(analysis, node_id, result, scope, self.evaluator)
        ]

    def apply_edge_transform(
        self, edge: EdgeDefinition | Edge, output: Any, scope: Mapping[str, Any]
    ) -> Any:
        """The value an edge hands its target: ``output``, or the edge's transform of it.

        Given the analysis' ``Edge`` (not its definition), a target whose ``inputs``
        names another node's output gets the transform of that output (read from
        ``scope``), as in memory."""
        if isinstance(edge, Edge):
            return transform_input(edge, output, scope, self.evaluator)
        if edge.transform is None:
            return output
        named = edge._named  # hyphenated node ids spelled out, by the analysis
        transform = named[1] if named is not None and named[1] else edge.transform
        try:
            return self.evaluator.evaluate(transform, Scope(scope, {"input": output}))
        except ExpressionError as exc:
            raise ExpressionError(
                f"transform of edge {edge.source!r} -> {edge.target!r} failed: {exc}",
                expression=edge.transform,
            ) from exc


def _signal_fingerprint(event: str, payload: Any) -> str:
    """What identifies a signal: its event and payload (a repeat is the same signal)."""
    text = json.dumps([event, payload], sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
