"""Routing and the in-memory traversal state machine (rules in ``_analysis``)."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from flowcraft._analysis import Edge, GraphAnalysis, Loop
from flowcraft.errors import ExpressionError
from flowcraft.expressions import resolve_path

if TYPE_CHECKING:
    from flowcraft.expressions import Evaluator
    from flowcraft.node import NodeResult


OUTPUTS_PREFIX: Final = "_outputs."
_MISSING: Final = object()
_PLAIN_PATH: Final = re.compile(r"[A-Za-z_$][\w$-]*(?:\.[\w$-]+)*\Z")


class Scope(Mapping[str, Any]):
    """What an expression sees, without copying the run's context.

    A name is, in order: an overlay (``result``, ``input``), a context key, the
    output of the node with that id (``_outputs.<id>``, as the TypeScript
    flowcraft also keeps each output under its bare id), and ``context``, the
    context itself (``context.key``, ``context["take-order"]``).
    """

    __slots__ = ("_data", "_overlay")

    def __init__(self, data: Mapping[str, Any], overlay: Mapping[str, Any] | None = None) -> None:
        self._data = data
        self._overlay = overlay

    def get(self, key: str, default: Any = None) -> Any:
        overlay = self._overlay
        if overlay is not None:
            value = overlay.get(key, _MISSING)
            if value is not _MISSING:
                return value
        data = self._data
        value = data.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if type(key) is str:
            value = data.get(OUTPUTS_PREFIX + key, _MISSING)
            if value is not _MISSING:
                return value
            if key == "context":
                return Scope(data) if overlay is not None else self
        return default

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[str]:
        seen = set(self._overlay or ())
        yield from seen
        for key in self._data:
            if key not in seen:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)


@dataclass(slots=True)
class Activation:
    """Run (or skip) activation ``generation`` of ``node_id``.

    ``inputs`` maps each choosing predecessor to the input it hands over (its
    output, or the edge transform's value).
    """

    node_id: str
    generation: int
    skip: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)
    gathered: bool = False  # an ``all`` join: the input is a dict by predecessor


def route(
    analysis: GraphAnalysis,
    node_id: str,
    result: NodeResult,
    scope: Mapping[str, Any],
    evaluator: Evaluator,
    evaluated: list[tuple[Edge, bool]] | None = None,
) -> list[Edge]:
    """The edges a node's result takes.

    Edges whose ``action`` equals the result's action and whose ``condition``
    holds win; when there are none (no such edge, or every condition false), the
    edges without an action whose condition holds are the default. A loop
    controller's conditional edges come first. ``evaluated`` (if given) collects
    each condition evaluated, with its outcome (the ``edge:evaluate`` events).
    """
    edges = analysis.out[node_id]
    if not edges:
        return []
    action = result.action
    defaults = analysis.default_edges[node_id]
    if node_id not in analysis.has_conditions:
        if action is not None and node_id in analysis.has_actions:
            by_action = [e for e in edges if e.action == action]
            return by_action or list(defaults)
        return list(defaults)
    cond_scope = Scope(scope, {"result": result.to_scope()})
    if node_id in analysis.loop_controllers:
        # A loop controller's conditional edges are tried first, whatever the action.
        chosen = _holding([e for e in edges if e.condition], cond_scope, evaluator, evaluated)
        if chosen:
            return chosen
    if action is not None and node_id in analysis.has_actions:
        by_action = [e for e in edges if e.action == action]
        if by_action:
            chosen = _holding(by_action, cond_scope, evaluator, evaluated)
            if chosen:
                return chosen
        # No edge for this action, or each one's condition is false: the default edges.
    return _holding(defaults, cond_scope, evaluator, evaluated)


def _holding(
    edges: Sequence[Edge],
    scope: Scope,
    evaluator: Evaluator,
    evaluated: list[tuple[Edge, bool]] | None,
) -> list[Edge]:
    """The edges whose condition holds (an edge without one always does)."""
    chosen = []
    for e in edges:
        if e.condition is None:
            chosen.append(e)
            continue
        try:
            ok = bool(evaluator.evaluate(e.condition, scope))
        except ExpressionError as exc:
            raise ExpressionError(
                f"condition of edge {e.source!r} -> {e.target!r} failed: {exc}",
                expression=e.condition,
            ) from exc
        if evaluated is not None:
            evaluated.append((e, ok))
        if ok:
            chosen.append(e)
    return chosen


def input_value(path: str, data: Mapping[str, Any], default: Any = None) -> Any:
    """An ``inputs`` path as the TypeScript flowcraft reads it, when it is a plain
    (possibly hyphenated) path: ``a`` or ``a.b.c`` is node ``a``'s output (and a
    path into it) if ``a`` has run; else the context key, or a path through the
    context. ``default`` when nothing matches. Not a plain path: ``default``."""
    if not _PLAIN_PATH.match(path):
        return default
    base, _, rest = path.partition(".")
    if not base.startswith("_"):
        output = data.get(OUTPUTS_PREFIX + base, _MISSING)
        if output is not _MISSING:
            return resolve_path(output, rest) if rest else output
    value = data.get(path, _MISSING)
    if value is not _MISSING:
        return value
    if rest:
        found = resolve_path(data, path)
        if found is not None:
            return found
    return default


def transform_input(edge: Edge, output: Any, scope: Mapping[str, Any], evaluator: Evaluator) -> Any:
    """What an edge hands to its target: the source's output, or its transform of it."""
    if edge.transform is None:
        return output
    if edge.target_inputs is not None and edge.target_inputs != edge.source:
        # The TypeScript flowcraft's rule: a target whose ``inputs`` names another
        # node's output gets the transform of that output, not of the source's.
        found = input_value(edge.target_inputs, scope, _MISSING)
        if found is not _MISSING:
            output = found
    try:
        return evaluator.evaluate(edge.transform, Scope(scope, {"input": output}))
    except ExpressionError as exc:
        raise ExpressionError(
            f"transform of edge {edge.source!r} -> {edge.target!r} failed: {exc}",
            expression=edge.transform,
        ) from exc


@dataclass(slots=True)
class _Join:
    seen: int = 0
    fired: bool = False
    inputs: dict[str, Any] = field(default_factory=dict)


class Traversal:
    """Joins, loops and completion for one run, in memory.

    ``resolve`` is called once per resolved activation and returns the
    activations it makes ready. Its state is plain data so a paused run can be
    saved and resumed.
    """

    def __init__(self, analysis: GraphAnalysis) -> None:
        self.analysis = analysis
        self.joins: dict[tuple[str, int], _Join] = {}
        self.latches: dict[tuple[int, int], dict[str, list[int]]] = {}
        self.latch_inputs: dict[tuple[int, int], dict[int, Any]] = {}
        self.sinks_left = len(analysis.sinks) + len(analysis.terminal_loops)
        self._sinks = frozenset(analysis.sinks)

    def to_state(self) -> dict[str, Any]:
        """JSON-ready state (for a paused run)."""
        return {
            "joins": [[n, g, j.seen, j.fired, j.inputs] for (n, g), j in self.joins.items()],
            "latches": [[i, g, t] for (i, g), t in self.latches.items()],
            "latchInputs": [
                [i, g, [[k, v] for k, v in ins.items()]]
                for (i, g), ins in self.latch_inputs.items()
            ],
            "sinksLeft": self.sinks_left,
        }

    @classmethod
    def from_state(cls, analysis: GraphAnalysis, state: Mapping[str, Any]) -> Traversal:
        t = cls(analysis)
        for n, g, seen, fired, inputs in state.get("joins", []):
            t.joins[(n, g)] = _Join(seen, fired, dict(inputs))
        for i, g, tails in state.get("latches", []):
            t.latches[(i, g)] = {k: list(v) for k, v in tails.items()}
        for i, g, pairs in state.get("latchInputs", []):
            t.latch_inputs[(i, g)] = {int(k): v for k, v in pairs}
        t.sinks_left = int(state.get("sinksLeft", t.sinks_left))
        return t

    @property
    def finished(self) -> bool:
        return self.sinks_left == 0

    def resolve(
        self,
        node_id: str,
        generation: int,
        chosen: list[Edge] | None,
        inputs_for: Mapping[int, Any],
    ) -> list[Activation]:
        """``chosen`` is None for a skip; ``inputs_for`` maps a chosen edge index to its input."""
        a = self.analysis
        simple = a.simple_next.get(node_id)
        if simple is not None:
            # One forward edge to a single-predecessor node: follow its signal.
            gen = generation if simple.intra else 1
            if chosen:
                return [Activation(simple.target, gen, inputs={node_id: inputs_for[simple.index]})]
            return [Activation(simple.target, gen, skip=True)]
        ready: list[Activation] = []
        chosen_by_target: dict[str, Edge] = {}
        if chosen:
            for e in chosen:
                chosen_by_target.setdefault(e.target, e)
        signalled: set[str] = set()
        for e in a.out[node_id]:
            if e.kind != "forward" or e.target in signalled:
                continue
            signalled.add(e.target)
            taken = chosen_by_target.get(e.target)
            gen = generation if e.intra else 1
            self._signal(e.target, gen, node_id, taken, inputs_for, ready)
        loop = a.tail_of_loop.get(node_id)
        if loop is not None:
            self._latch(loop, generation, node_id, chosen or [], inputs_for, ready)
        if node_id in self._sinks and generation == 1:
            self.sinks_left -= 1
        return ready

    def _signal(
        self,
        target: str,
        generation: int,
        source: str,
        taken: Edge | None,
        inputs_for: Mapping[int, Any],
        ready: list[Activation],
    ) -> None:
        required = self.analysis.required(target, generation)
        if len(required) <= 1:
            if taken is None:
                ready.append(Activation(target, generation, skip=True))
            else:
                ready.append(
                    Activation(target, generation, inputs={source: inputs_for[taken.index]})
                )
            return
        key = (target, generation)
        join = self.joins.get(key)
        if join is None:
            join = self.joins[key] = _Join()
        join.seen += 1
        if taken is not None:
            join.inputs[source] = inputs_for[taken.index]
        complete = join.seen >= len(required)
        if self.analysis.nodes[target].join_strategy == "any":
            if taken is not None and not join.fired:
                join.fired = True
                ready.append(Activation(target, generation, inputs=dict(join.inputs)))
            elif complete and not join.fired:
                ready.append(Activation(target, generation, skip=True))
        elif complete:
            ready.append(
                Activation(target, generation, not join.inputs, join.inputs, gathered=True)
            )
        if complete:
            del self.joins[key]

    def _latch(
        self,
        loop: Loop,
        generation: int,
        tail: str,
        chosen: list[Edge],
        inputs_for: Mapping[int, Any],
        ready: list[Activation],
    ) -> None:
        key = (loop.index, generation)
        latch = self.latches.setdefault(key, {})
        latch[tail] = [e.index for e in chosen if e.kind != "forward"]
        self.latch_inputs.setdefault(key, {}).update(
            {i: inputs_for[i] for i in latch[tail] if i in inputs_for}
        )
        if len(latch) < len(loop.tails):
            return
        del self.latches[key]
        carried = self.latch_inputs.pop(key, {})
        out = self.analysis.out
        back = [e for t in loop.tails for e in out[t] if e.kind == "back" and e.index in latch[t]]
        if back:
            inputs = {e.source: carried.get(e.index) for e in back}
            ready.append(Activation(loop.head, generation + 1, inputs=inputs))
            return
        if loop.terminal:
            self.sinks_left -= 1
        for t in loop.tails:
            signalled: set[str] = set()
            for e in out[t]:
                if e.kind != "exit" or e.target in signalled:
                    continue
                signalled.add(e.target)
                taken = next(
                    (x for x in out[t] if x.target == e.target and x.index in latch[t]), None
                )
                self._signal(e.target, 1, t, taken, carried, ready)
