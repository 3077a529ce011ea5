"""Replay a recorded run against new node code and report what changes.

Each recorded step (a node's resolved activation) runs again, alone, through the new
code: with the input it was given and the context as it was right before it (both
from the run's history). Its output, action, context writes and failure are compared
with the recorded ones. Steps are independent: a changed output does not flow into
the next step's input (the recorded input is used), so every difference is the
node's own. Re-run the flow to see where the changes lead.

A value the history did not keep (over the store's ``max_value_bytes``) is never
replayed as if it were the run's: a step whose input was not kept, or whose node
reads a context key that was not kept, is skipped (saying so); a recorded output or
write that was not kept is compared with the new one by its size and hash.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.context import Context, InMemoryContext
from flowcraft.errors import NodeExecutionError
from flowcraft.flow import Flow
from flowcraft.history import History, HistoryStore, truncated
from flowcraft.history._reader import apply_step, initial_context, steps_of
from flowcraft.node import NodeImplementation
from flowcraft.runtime import FlowRuntime, RuntimeOptions

__all__ = ["ReplayReport", "StepChange", "replay_run"]


@dataclass(frozen=True, slots=True)
class StepChange:
    """One difference at one step. ``what``: ``output``, ``action``, ``context`` (a
    write: ``key`` names it; None stands for no write), ``error`` (the message, None
    for none) or ``missing`` (the new blueprint has no such node)."""

    step: int
    node_id: str
    activation: int
    what: str
    recorded: Any
    replayed: Any
    key: str | None = None

    def describe(self) -> str:
        where = f"step {self.step} {self.node_id}"
        if self.activation != 1:
            where += f"#{self.activation}"
        what = f"context[{self.key!r}]" if self.key is not None else self.what
        return f"{where}: {what} {_short(self.recorded)} -> {_short(self.replayed)}"


@dataclass(slots=True)
class ReplayReport:
    """What replaying a run showed: ``changes`` (none: the new code behaves as the
    recorded run did), ``replayed`` steps run again, ``skipped`` steps with why."""

    run_id: str
    replayed: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    changes: list[StepChange] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def by_node(self) -> dict[str, list[StepChange]]:
        out: dict[str, list[StepChange]] = {}
        for change in self.changes:
            out.setdefault(change.node_id, []).append(change)
        return out

    def summary(self) -> str:
        head = (
            f"run {self.run_id}: {len(self.replayed)} steps replayed, "
            f"{len(self.skipped)} skipped, {len(self.changes)} changes"
        )
        return "\n".join([head, *(f"  {c.describe()}" for c in self.changes)])


async def replay_run(
    source: History | HistoryStore,
    run_id: str,
    target: Flow | WorkflowBlueprint,
    *,
    registry: Mapping[str, NodeImplementation] | None = None,
    dependencies: Mapping[str, Any] | None = None,
    nodes: Collection[str] | None = None,
) -> ReplayReport:
    """Replay run ``run_id`` (its history in ``source``) against ``target``: a Flow
    (its callables are the new code) or a blueprint with ``registry``. ``nodes``
    limits the replay to those nodes. One attempt per step, no retries."""
    history = source if isinstance(source, History) else History(source)
    events = await history.events(run_id)
    if not events:
        raise LookupError(f"no history for run {run_id!r}")
    runtime = FlowRuntime(
        RuntimeOptions(registry=dict(registry or {}), dependencies=dict(dependencies or {}))
    )
    blueprint = runtime.blueprint(target)
    known = {n.id for n in blueprint.nodes}
    report = ReplayReport(run_id)
    context = initial_context(events)
    for step in steps_of(events):
        before = dict(context)
        apply_step(context, step)
        if nodes is not None and step.node_id not in nodes:
            continue
        if step.node_id not in known:
            report.changes.append(
                StepChange(step.index, step.node_id, step.activation, "missing", True, None)
            )
            continue
        why = (
            "skipped in the recorded run"
            if step.status == "skipped"
            else "a wait, resumed from outside"
            if step.status == "resumed"
            else "no start recorded"
            if step.attempts == 0
            else f"its input was not kept in the history ({truncated(step.input)})"
            if "input" in step.truncated
            else None
        )
        if why is not None:
            report.skipped.append((step.index, step.node_id, why))
            continue
        given = _Watched(before)
        error: str | None = None
        output: Any = None
        action: str | None = None
        writes: dict[str, Any] = {}
        try:
            execution = await runtime.execute_node(
                blueprint,
                step.node_id,
                given,
                run_id=run_id,
                input=step.input,
                activation=step.activation,
                max_attempts=1,
            )
        except NodeExecutionError as exc:
            error = str(exc)
        if given.read_lost:
            lost = ", ".join(repr(k) for k in sorted(given.read_lost))
            report.skipped.append(
                (step.index, step.node_id, f"read context {lost}, not kept in the history")
            )
            continue
        if error is None:
            if execution.awaiting:
                report.skipped.append((step.index, step.node_id, "waits when replayed"))
                continue
            output = execution.result.output
            action = execution.result.action
            writes = {op.key: op.value if op.op == "set" else _DELETED for op in execution.deltas}
        report.replayed.append(step.index)
        recorded_writes = {
            str(c.get("key")): c.get("value") if c.get("op") != "delete" else _DELETED
            for c in step.changes
        }
        differences: list[tuple[str, Any, Any, str | None]] = []
        recorded_error = step.error if step.status == "failed" else None
        if (recorded_error is None) != (error is None):
            differences.append(("error", recorded_error, error, None))
        if error is None and recorded_error is None:
            if not _same(step.output, output):
                differences.append(("output", step.output, _as_recorded(output), None))
            if action != step.action:
                differences.append(("action", step.action, action, None))
            for key in sorted(recorded_writes.keys() | writes.keys()):
                old, new = recorded_writes.get(key), writes.get(key)
                if not _same(old, new):
                    differences.append(("context", old, _as_recorded(new), key))
        report.changes += [
            StepChange(step.index, step.node_id, step.activation, what, old, new, key)
            for what, old, new, key in differences
        ]
    return report


_DELETED = {"deleted": True}


class _Watched(InMemoryContext):
    """The context a replayed node sees: notes each read of a key whose value the
    history did not keep (that value is a marker, not the run's)."""

    __slots__ = ("lost", "read_lost")

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(Context(values))
        self.lost = {k for k, v in values.items() if truncated(v) is not None}
        self.read_lost: set[str] = set()

    async def get(self, key: str) -> Any:
        if key in self.lost:
            self.read_lost.add(key)
        return await super().get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        self.read_lost.update(self.lost.intersection(keys))
        return await super().get_many(keys)

    async def to_dict(self) -> dict[str, Any]:
        self.read_lost.update(self.lost)
        return await super().to_dict()


def _same(recorded: Any, replayed: Any) -> bool:
    """A recorded value (as history holds it: JSON, or a marker) and a new one."""
    if recorded is _DELETED or replayed is _DELETED:
        return recorded is replayed
    marker = truncated(recorded)
    if marker is not None:
        return marker.matches(replayed)
    return bool(recorded == _as_recorded(replayed))


def _as_recorded(value: Any) -> Any:
    """The value as history holds it (JSON), so a tuple equals its recorded list."""
    return json.loads(json.dumps(value, default=repr))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=repr)
    return text if len(text) <= width else text[: width - 3] + "..."
