"""Stepping through a run and tracing one: the TypeScript flowcraft's
``createStepper`` and ``runWithTrace`` (its ``flowcraft/testing`` helpers).

Both run in memory on a :class:`~flowcraft.runtime.FlowRuntime`'s registry and
blueprints. Neither needs pytest.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TextIO

from flowcraft._traversal import Activation
from flowcraft.events import CollectingEventBus, FlowEvent, emit
from flowcraft.runtime import FlowRuntime, ManualRun, RunStatus, WorkflowResult

if TYPE_CHECKING:
    from flowcraft.blueprint import WorkflowBlueprint
    from flowcraft.events import EventBus
    from flowcraft.flow import Flow

__all__ = ["Stepper", "create_stepper", "format_trace", "run_with_trace"]


@dataclasses.dataclass(slots=True)
class _Snapshot:
    data: dict[str, Any]
    traversal: dict[str, Any]
    ready: list[Activation]
    waiting: dict[str, Activation]
    errors: list[Any]
    failed: bool


class Stepper:
    """One run, a step at a time: each :meth:`next` runs every node that is ready
    (concurrently) and stops; :meth:`prev` goes back one step; :meth:`reset` to
    the start. Between steps the result's status is ``stalled`` (not finished)."""

    def __init__(
        self,
        runtime: FlowRuntime,
        target: Flow | WorkflowBlueprint | Mapping[str, Any] | str,
        initial: Mapping[str, Any] | None = None,
        *,
        run_id: str = "stepper",
    ) -> None:
        self.runtime = runtime
        self.blueprint = runtime.blueprint(target)
        runtime.check_registry(self.blueprint)
        self.analysis = runtime.analysis(self.blueprint)
        self._initial = copy.deepcopy(dict(initial or {}))
        self._run_id = run_id
        self._history: list[_Snapshot] = []
        self.reset()

    def reset(self) -> None:
        """Back to the start: the initial context, the start nodes ready."""
        self.run = ManualRun(
            self.runtime, self.blueprint, copy.deepcopy(self._initial), run_id=self._run_id
        )
        self._ready = self.run.start
        self._history.clear()

    @property
    def ready(self) -> list[str]:
        """The nodes the next step runs (or skips)."""
        return [a.node_id for a in self._ready]

    def is_done(self) -> bool:
        return not self._ready or self.run.failed

    async def next(self) -> WorkflowResult | None:
        """Run the ready nodes; None when nothing is left to run."""
        if self.is_done():
            return None
        self._history.append(self._snapshot())
        batch, self._ready = self._ready, []
        for found in await asyncio.gather(*(self._one(act) for act in batch)):
            self._ready.extend(found)
        return self.result()

    def prev(self) -> WorkflowResult | None:
        """Undo the last step; None when at the start."""
        if not self._history:
            return None
        snap = self._history.pop()
        self.run.restore(snap.data, snap.traversal, snap.waiting, snap.errors, snap.failed)
        self._ready = snap.ready
        return self.result()

    def result(self) -> WorkflowResult:
        """Where the run stands now."""
        run = self.run
        if run.failed:
            status = RunStatus.FAILED
        elif self._ready:
            status = RunStatus.STALLED
        elif run.waiting:
            status = RunStatus.AWAITING
        elif run.traversal.finished:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.STALLED
        return WorkflowResult(
            run.run_id, status, dict(run.context.data), list(run.errors), sorted(run.waiting)
        )

    async def _one(self, act: Activation) -> list[Activation]:
        return await self.run.step(act)

    def _snapshot(self) -> _Snapshot:
        run = self.run
        return _Snapshot(
            copy.deepcopy(run.context.data),
            copy.deepcopy(run.traversal.to_state()),
            copy.deepcopy(self._ready),
            copy.deepcopy(run.waiting),
            list(run.errors),
            run.failed,
        )


async def create_stepper(
    runtime: FlowRuntime,
    target: Flow | WorkflowBlueprint | Mapping[str, Any] | str,
    initial: Mapping[str, Any] | None = None,
) -> Stepper:
    """A :class:`Stepper` (async, as the original's ``createStepper`` is)."""
    return Stepper(runtime, target, initial)


class _Tee:
    def __init__(self, first: CollectingEventBus, second: EventBus | None) -> None:
        self.first = first
        self.second = second

    async def emit(self, event: FlowEvent) -> None:
        self.first.emit(event)
        await emit(self.second, event)


def format_trace(events: list[FlowEvent]) -> str:
    """One line per event: type, node and its data (as JSON where it can be)."""
    lines = []
    for i, event in enumerate(events):
        try:
            data = json.dumps(event.data, default=repr, ensure_ascii=False)
        except (TypeError, ValueError):
            data = repr(event.data)
        node = f" {event.node_id}" if event.node_id else ""
        lines.append(f"{i:4d} {event.type}{node} {data}")
    return "\n".join(lines)


async def run_with_trace(
    runtime: FlowRuntime,
    target: Flow | WorkflowBlueprint | Mapping[str, Any] | str,
    initial: Mapping[str, Any] | None = None,
    *,
    out: TextIO | None = None,
    always: bool | None = None,
    **run_options: Any,
) -> WorkflowResult:
    """Run, keeping every event; print the trace (to ``out``, default stderr) when
    the run did not complete, or always when ``always`` (default: the ``DEBUG``
    environment variable is set). The runtime's own event bus still gets every event."""
    events = CollectingEventBus()
    traced = FlowRuntime(
        dataclasses.replace(runtime.options, event_bus=_Tee(events, runtime.event_bus))
    )
    traced.registry.update({k: v for k, v in runtime.registry.items() if k not in traced.registry})
    traced.blueprints.update(runtime.blueprints)
    result = await traced.run(target, initial, **run_options)
    if always is None:
        always = bool(os.environ.get("DEBUG"))
    if always or result.status is not RunStatus.COMPLETED:
        stream = out if out is not None else sys.stderr
        stream.write(f"run {result.run_id} ended {result.status}; trace:\n")
        stream.write(format_trace(events.events) + "\n")
    return result
