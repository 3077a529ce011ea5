"""Routing and the in-memory traversal state machine (rules in ``_analysis``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowcraft._analysis import Edge, GraphAnalysis, Loop
from flowcraft.errors import ExpressionError

if TYPE_CHECKING:
    from flowcraft.expressions import Evaluator
    from flowcraft.node import NodeResult


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
) -> list[Edge]:
    """The edges a node's result takes.

    Edges whose ``action`` equals the result's action win; when none does, the
    edges without an action are the default. A ``condition`` must then hold.
    """
    edges = analysis.out[node_id]
    if not edges:
        return []
    action = result.action
    candidates: list[Edge] | tuple[Edge, ...]
    if action is not None and node_id in analysis.has_actions:
        candidates = [e for e in edges if e.action == action]
        if not candidates:
            candidates = analysis.default_edges[node_id]
    else:
        candidates = analysis.default_edges[node_id]
    if node_id not in analysis.has_conditions:
        return list(candidates)
    chosen = []
    cond_scope: dict[str, Any] | None = None
    for e in candidates:
        if e.condition is None:
            chosen.append(e)
            continue
        if cond_scope is None:
            cond_scope = {**scope, "result": result.to_scope()}
        try:
            ok = evaluator.evaluate(e.condition, cond_scope)
        except ExpressionError as exc:
            raise ExpressionError(
                f"condition of edge {e.source!r} -> {e.target!r} failed: {exc}",
                expression=e.condition,
            ) from exc
        if ok:
            chosen.append(e)
    return chosen


def transform_input(edge: Edge, output: Any, scope: Mapping[str, Any], evaluator: Evaluator) -> Any:
    """What an edge hands to its target: the source's output, or its transform of it."""
    if edge.transform is None:
        return output
    try:
        return evaluator.evaluate(edge.transform, {**scope, "input": output})
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
        self.sinks_left = len(analysis.sinks)
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
