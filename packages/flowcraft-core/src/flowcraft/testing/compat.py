"""Blueprints written for the TypeScript flowcraft, run unchanged: the conformance
scenarios of the behaviours it defines (issue 18).

Each :class:`Scenario` is a registry, camelCase JSON blueprints and a check of the
final status and context. :func:`run_in_memory` runs one on :class:`FlowRuntime`;
:class:`TypeScriptCompatTests` runs them all on an adapter's fleet (a mixin for a
class that also has the kit's ``timeout_seconds`` and ``worker_count``), so the
in-memory engine and every distributed adapter are held to the same results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.node import NodeContext, NodeImplementation, NodeResult
from flowcraft.runtime import FlowRuntime, RuntimeOptions

if TYPE_CHECKING:
    from flowcraft.testing.adapter import AdapterFactory

__all__ = ["SCENARIOS", "Scenario", "TypeScriptCompatTests", "run_in_memory"]

Check = Callable[[str, Mapping[str, Any]], None]
Blueprint = dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """Run ``blueprints[0]`` (the others are sub-flows) from ``initial``; ``check``
    asserts on the final status and context."""

    name: str
    registry: Mapping[str, NodeImplementation]
    blueprints: tuple[Mapping[str, Any], ...]
    check: Check
    initial: Mapping[str, Any] = field(default_factory=dict)

    def options(self, **kw: Any) -> RuntimeOptions:
        parsed = {b["id"]: WorkflowBlueprint.parse(dict(b)) for b in self.blueprints}
        return RuntimeOptions(registry=dict(self.registry), blueprints=parsed, **kw)


async def run_in_memory(scenario: Scenario) -> tuple[str, dict[str, Any]]:
    """Run a scenario on :class:`FlowRuntime`; return its status and context."""
    runtime = FlowRuntime(scenario.options())
    result = await runtime.run(scenario.blueprints[0]["id"], dict(scenario.initial))
    return str(result.status), result.context


def _out(context: Mapping[str, Any], node_id: str) -> Any:
    return context.get("_outputs." + node_id)


def _completed(status: str) -> None:
    assert status == "completed", f"the run ended {status}"


def _echo(ctx: NodeContext) -> Any:
    return ctx.input


# ------------------------------------------------------------------ the scenarios


def _inputs_by_node_id() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert _out(ctx, "make-drink") == "Made Medium Coffee"
        assert _out(ctx, "serve-customer") == "Served: Made Medium Coffee"
        assert _out(ctx, "both") == {
            "order": {"item": "Coffee", "size": "Medium"},
            "size": "Medium",
            "drink": "Made Medium Coffee",
            "note": "from the context",
        }

    async def take_order(ctx: NodeContext) -> Any:
        order = {"item": "Coffee", "size": "Medium"}
        await ctx.context.set("order", order)
        return order

    return Scenario(
        "inputs name node ids (hyphenated too) before context keys",
        {
            "takeOrderFn": take_order,
            "makeDrinkFn": lambda c: f"Made {c.input['size']} {c.input['item']}",
            "serveCustomerFn": lambda c: f"Served: {c.input}",
            "echo": _echo,
        },
        (
            {
                "id": "coffee-shop-order",
                "nodes": [
                    {"id": "take-order", "uses": "takeOrderFn"},
                    {"id": "make-drink", "uses": "makeDrinkFn", "inputs": "take-order"},
                    {"id": "serve-customer", "uses": "serveCustomerFn", "inputs": "make-drink"},
                    {
                        "id": "both",
                        "uses": "echo",
                        "inputs": {
                            "order": "take-order",
                            "size": "take-order.size",
                            "drink": "make-drink",
                            "note": "note",
                        },
                    },
                ],
                "edges": [
                    {"source": "take-order", "target": "make-drink"},
                    {"source": "make-drink", "target": "serve-customer"},
                    {"source": "serve-customer", "target": "both"},
                ],
            },
        ),
        check,
        {"note": "from the context", "make-drink": "a context key loses to the node"},
    )


def _node_id_conditions() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert _out(ctx, "small") == "small order"
        assert "_outputs.large" not in ctx
        assert _out(ctx, "enough") == "fetched 9"
        assert "_outputs.too-few" not in ctx
        assert _out(ctx, "read") == {"total": 300}

    async def read(ctx: NodeContext) -> Any:
        return await ctx.context.get("route")

    return Scenario(
        "conditions and context.get read node outputs by bare id",
        {
            "route": lambda c: {"total": 300},
            "fetch": lambda c: {"total": 9},
            "small": lambda c: "small order",
            "large": lambda c: "large order",
            "enough": lambda c: f"fetched {c.input['total']}",
            "few": lambda c: "too few",
            "read": read,
        },
        (
            {
                "id": "node-id-conditions",
                "nodes": [
                    {"id": "route", "uses": "route"},
                    {"id": "small", "uses": "small"},
                    {"id": "large", "uses": "large"},
                    {"id": "fetch-data", "uses": "fetch"},
                    {"id": "enough", "uses": "enough"},
                    {"id": "too-few", "uses": "few"},
                    {"id": "read", "uses": "read"},
                ],
                "edges": [
                    {"source": "route", "target": "small", "condition": "route.total < 500"},
                    {"source": "route", "target": "large", "condition": "route.total >= 500"},
                    {"source": "small", "target": "fetch-data"},
                    {
                        "source": "fetch-data",
                        "target": "enough",
                        "condition": "fetch-data.total > 5",
                    },
                    {
                        "source": "fetch-data",
                        "target": "too-few",
                        "condition": "fetch-data.total <= 5",
                    },
                    {"source": "enough", "target": "read"},
                ],
            },
        ),
        check,
    )


def _context_in_transforms() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert _out(ctx, "scaled") == 15
        assert _out(ctx, "labelled") == "5 of a"

    return Scenario(
        "transforms read context.<key> and context[node id]",
        {"five": lambda c: 5, "echo": _echo},
        (
            {
                "id": "context-transforms",
                "nodes": [
                    {"id": "a", "uses": "five"},
                    {"id": "scaled", "uses": "echo"},
                    {"id": "labelled", "uses": "echo"},
                ],
                "edges": [
                    {"source": "a", "target": "scaled", "transform": "input * context.multiplier"},
                    {
                        "source": "scaled",
                        "target": "labelled",
                        "transform": 'str(context["a"]) + " of " + context.name',
                    },
                ],
            },
        ),
        check,
        {"multiplier": 3, "name": "a"},
    )


def _default_edge_fallback() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert "_outputs.big" not in ctx
        assert _out(ctx, "fallback") == 1
        assert _out(ctx, "end") == 1

    return Scenario(
        "an action whose edge's condition is false falls back to the default edge",
        {"decide": lambda c: NodeResult(output=1, action="go"), "echo": _echo},
        (
            {
                "id": "default-edge",
                "nodes": [
                    {"id": "decide", "uses": "decide"},
                    {"id": "big", "uses": "echo"},
                    {"id": "fallback", "uses": "echo"},
                    {"id": "end", "uses": "echo", "config": {"joinStrategy": "any"}},
                ],
                "edges": [
                    {
                        "source": "decide",
                        "target": "big",
                        "action": "go",
                        "condition": "result.output > 5",
                    },
                    {"source": "decide", "target": "fallback"},
                    {"source": "big", "target": "end"},
                    {"source": "fallback", "target": "end"},
                ],
            },
        ),
        check,
    )


def _subflow_outputs() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert ctx.get("addition_result") == 30
        assert _out(ctx, "double") == 42  # the child's terminal output, not its context
        assert _out(ctx, "after") == 42
        assert _out(ctx, "seeded") == 22

    async def prepare(ctx: NodeContext) -> str:
        await ctx.context.set("val1", 10)
        await ctx.context.set("val2", 20)
        return "Data ready"

    async def add(ctx: NodeContext) -> Any:
        return await ctx.context.get("a") + await ctx.context.get("b")

    async def seed_plus_one(ctx: NodeContext) -> Any:
        return await ctx.context.get("seed") + 1

    return Scenario(
        "sub-flows: inputs and outputs by node id, the child's terminal output",
        {
            "prepare": prepare,
            "addFn": add,
            "twenty-one": lambda c: 21,
            "times2": lambda c: c.input * 2,
            "seedPlusOne": seed_plus_one,
            "echo": _echo,
        },
        (
            {
                "id": "parent-workflow",
                "nodes": [
                    {"id": "prepare-data", "uses": "prepare"},
                    {
                        "id": "run-math",
                        "uses": "subflow",
                        "params": {
                            "blueprintId": "math-subflow",
                            "inputs": {"a": "val1", "b": "val2"},
                            "outputs": {"addition_result": "add"},
                        },
                    },
                    {"id": "n", "uses": "twenty-one"},
                    {"id": "double", "uses": "subflow", "params": {"blueprintId": "doubler"}},
                    {"id": "after", "uses": "echo"},
                    {
                        "id": "seeded",
                        "uses": "subflow",
                        "params": {"blueprintId": "seeded", "inputs": {"seed": "n"}},
                    },
                ],
                "edges": [
                    {"source": "prepare-data", "target": "run-math"},
                    {"source": "run-math", "target": "n"},
                    {"source": "n", "target": "double"},
                    {"source": "double", "target": "after"},
                    {"source": "after", "target": "seeded"},
                ],
            },
            {"id": "math-subflow", "nodes": [{"id": "add", "uses": "addFn"}]},
            {
                "id": "doubler",
                "nodes": [{"id": "take", "uses": "echo"}, {"id": "times", "uses": "times2"}],
                "edges": [{"source": "take", "target": "times"}],
            },
            {"id": "seeded", "nodes": [{"id": "plus", "uses": "seedPlusOne"}]},
        ),
        check,
    )


def _counter_loop(with_exit: bool) -> Blueprint:
    """The counter of the TypeScript docs' loops guide, as its builder writes it."""
    blueprint: Blueprint = {
        "id": "loop-workflow" if with_exit else "loop-workflow-no-exit",
        "nodes": [
            {"id": "initialize", "uses": "initialize"},
            {"id": "increment", "uses": "increment"},
            {
                "id": "counter",
                "uses": "loop-controller",
                "params": {"condition": "count < 5"},
                "config": {"joinStrategy": "any"},
            },
        ],
        "edges": [
            {"source": "increment", "target": "counter"},
            {
                "source": "counter",
                "target": "increment",
                "action": "continue",
                "transform": 'context["increment"]',
            },
            {"source": "initialize", "target": "counter"},
        ],
    }
    if with_exit:
        blueprint["nodes"].append({"id": "done", "uses": "echo"})
        blueprint["edges"].append(
            {
                "source": "counter",
                "target": "done",
                "action": "break",
                "transform": 'context["increment"]',
            }
        )
    return blueprint


def _loop_registry() -> dict[str, NodeImplementation]:
    async def initialize(ctx: NodeContext) -> str:
        await ctx.context.set("count", 0)
        return "Initialized"

    async def increment(ctx: NodeContext) -> int:
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return count

    return {"initialize": initialize, "increment": increment, "echo": _echo}


def _loop_controller() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert ctx.get("count") == 5
        assert _out(ctx, "increment") == 5
        assert _out(ctx, "done") == 5

    return Scenario(
        "loop-controller: continue while the condition holds, then break",
        _loop_registry(),
        (_counter_loop(with_exit=True),),
        check,
    )


def _loop_controller_without_exit() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert ctx.get("count") == 5
        assert _out(ctx, "increment") == 5

    return Scenario(
        "loop-controller with no break edge: its break ends the run",
        _loop_registry(),
        (_counter_loop(with_exit=False),),
        check,
    )


def _scatter_gather() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert ctx.get("doubled") == [20, 40, 60]
        assert _out(ctx, "double-items_gather") == [20, 40, 60]
        assert _out(ctx, "sum") == 120

    return Scenario(
        "batch-scatter / batch-gather with inputKey, outputKey and chunkSize",
        {"start": lambda c: [10, 20, 30], "double": lambda c: c.input * 2, "sum": _sum},
        (
            {
                "id": "batch-workflow",
                "nodes": [
                    {"id": "start", "uses": "start"},
                    {
                        "id": "double-items_scatter",
                        "uses": "batch-scatter",
                        "inputs": "start",
                        "params": {
                            "workerUsesKey": "double",
                            "outputKey": "doubled",
                            "gatherNodeId": "double-items_gather",
                            "chunkSize": 2,
                        },
                    },
                    {
                        "id": "double-items_gather",
                        "uses": "batch-gather",
                        "params": {"outputKey": "doubled", "gatherNodeId": "double-items_gather"},
                        "config": {"joinStrategy": "all"},
                    },
                    {"id": "sum", "uses": "sum"},
                ],
                "edges": [
                    {"source": "start", "target": "double-items_scatter"},
                    {"source": "double-items_scatter", "target": "double-items_gather"},
                    {"source": "double-items_gather", "target": "sum"},
                ],
            },
        ),
        check,
    )


def _sum(ctx: NodeContext) -> Any:
    return sum(ctx.input)


def _builtin_names() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert _out(ctx, "nap") == "rested"
        assert _out(ctx, "after") == "rested"

    return Scenario(
        "the original's built-in names (sleep with a duration string)",
        {"rested": lambda c: "rested", "echo": _echo},
        (
            {
                "id": "builtin-names",
                "nodes": [
                    {"id": "a", "uses": "rested"},
                    {"id": "nap", "uses": "sleep", "params": {"duration": "0s"}},
                    {"id": "after", "uses": "echo"},
                ],
                "edges": [
                    {"source": "a", "target": "nap"},
                    {"source": "nap", "target": "after"},
                ],
            },
        ),
        check,
    )


def _transform_over_inputs() -> Scenario:
    def check(status: str, ctx: Mapping[str, Any]) -> None:
        _completed(status)
        assert _out(ctx, "c") == 3  # the transform of ``a``'s output, which c's inputs name
        assert _out(ctx, "d") == 20  # the transform of the source's output

    return Scenario(
        "an edge transform wins over the target's inputs",
        {"two": lambda c: 2, "ten": lambda c: 10, "echo": _echo},
        (
            {
                "id": "transform-over-inputs",
                "nodes": [
                    {"id": "a", "uses": "two"},
                    {"id": "b", "uses": "ten"},
                    {"id": "c", "uses": "echo", "inputs": "a"},
                    {"id": "d", "uses": "echo", "inputs": {"x": "a"}},
                ],
                "edges": [
                    {"source": "a", "target": "b"},
                    {"source": "b", "target": "c", "transform": "input + 1"},
                    {"source": "b", "target": "d", "transform": "input * 2"},
                ],
            },
        ),
        check,
    )


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "inputs_by_node_id": _inputs_by_node_id,
    "node_id_conditions": _node_id_conditions,
    "context_in_transforms": _context_in_transforms,
    "default_edge_fallback": _default_edge_fallback,
    "subflow_outputs": _subflow_outputs,
    "loop_controller": _loop_controller,
    "loop_controller_without_exit": _loop_controller_without_exit,
    "scatter_gather": _scatter_gather,
    "builtin_names": _builtin_names,
    "transform_over_inputs": _transform_over_inputs,
}
"""Every scenario, by name (a factory each, so every run gets fresh callables)."""


@pytest.mark.asyncio
class TypeScriptCompatTests:
    """The scenarios on an adapter's fleet: mix into a class with an
    ``adapter_factory`` fixture (as :class:`~flowcraft.testing.AdapterConformanceTests`
    subclasses have)."""

    if TYPE_CHECKING:
        timeout_seconds: ClassVar[float]
        worker_count: ClassVar[int]

    async def _run(self, adapter_factory: AdapterFactory, name: str) -> None:
        from flowcraft.testing.adapter import Fleet

        scenario = SCENARIOS[name]()
        fleet = Fleet(adapter_factory, scenario.options(), timeout=self.timeout_seconds)
        await fleet.start(self.worker_count)
        try:
            result = await fleet.run(scenario.blueprints[0]["id"], dict(scenario.initial))
            assert fleet.dead_workers() == [], "a worker died"
        finally:
            await fleet.stop()
        scenario.check(str(result.status), result.context)

    async def test_ts_inputs_by_node_id(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "inputs_by_node_id")

    async def test_ts_node_id_conditions(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "node_id_conditions")

    async def test_ts_context_in_transforms(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "context_in_transforms")

    async def test_ts_default_edge_fallback(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "default_edge_fallback")

    async def test_ts_subflow_outputs(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "subflow_outputs")

    async def test_ts_loop_controller(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "loop_controller")

    async def test_ts_loop_controller_without_exit(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "loop_controller_without_exit")

    async def test_ts_scatter_gather(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "scatter_gather")

    async def test_ts_builtin_names(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "builtin_names")

    async def test_ts_transform_over_inputs(self, adapter_factory: AdapterFactory) -> None:
        await self._run(adapter_factory, "transform_over_inputs")
