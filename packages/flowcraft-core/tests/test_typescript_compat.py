"""Blueprints written for the TypeScript flowcraft run unchanged (issue 18): the
scenarios of flowcraft.testing.compat in memory and on the in-memory adapter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.testing import AdapterFactory
from flowcraft.testing.compat import SCENARIOS, TypeScriptCompatTests, run_in_memory


def _original(data: dict[str, Any]) -> dict[str, Any]:
    """An event's payload as the original has it: ``activation`` (which activation of
    the node it belongs to, for run history) is this engine's addition."""
    return {k: v for k, v in data.items() if k != "activation"}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_scenario_in_memory(name: str) -> None:
    scenario = SCENARIOS[name]()
    status, context = await run_in_memory(scenario)
    scenario.check(status, context)


async def _yield(operation: str, run_id: str) -> None:
    await asyncio.sleep(0)


class TestCompatOnInMemoryAdapter(TypeScriptCompatTests):
    timeout_seconds = 5.0
    worker_count = 2

    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        broker = InMemoryBroker(fault=_yield)

        def build(options: RuntimeOptions, **kw: Any) -> InMemoryAdapter:
            return InMemoryAdapter(runtime_options=options, broker=broker, **kw)

        return build


async def test_edge_transform_wins_over_declared_inputs() -> None:
    from flowcraft import Flow, FlowRuntime

    flow = (
        Flow("transform-inputs")
        .node("a", lambda c: 2)
        .node("b", lambda c: 10)
        .node("c", lambda c: c.input, inputs="a")
        .node("d", lambda c: c.input, inputs={"x": "a"})
        .chain("a", "b")
        .edge("b", "c", transform="input + 1")
        .edge("b", "d", transform="input * 2")
    )
    result = await FlowRuntime().run(flow)
    assert result.status == "completed", result.errors
    # The target names another node in ``inputs``: the transform gets that output.
    assert result.output("c") == 3
    # A mapping: the transform of the source's output is the input.
    assert result.output("d") == 20


async def test_hyphenated_input_is_not_a_subtraction_and_expressions_still_work() -> None:
    from flowcraft import Flow, FlowRuntime

    flow = (
        Flow("exprs")
        .node("take-order", lambda c: {"n": 4})
        .node("calc", lambda c: c.input, inputs={"double": "take-order.n * 2", "raw": "take-order"})
        .chain("take-order", "calc")
    )
    result = await FlowRuntime().run(flow)
    assert result.status == "completed", result.errors
    assert result.output("calc") == {"double": 8, "raw": {"n": 4}}


async def test_class_node_post_runs_after_fallback_and_recover_after_failure() -> None:
    from flowcraft import BaseNode, Flow, FlowRuntime, NodeContext

    seen: list[str] = []

    class Flaky(BaseNode):
        async def exec(self, prepared: Any, ctx: NodeContext) -> Any:
            raise RuntimeError("down")

        async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
            return "cached"

        async def post(self, result: Any, ctx: NodeContext) -> Any:
            seen.append(f"post {result}")
            return f"{result}, posted"

        async def recover(self, error: BaseException, ctx: NodeContext) -> None:
            seen.append(f"recover {error}")

    class BadRecover(Flaky):
        async def recover(self, error: BaseException, ctx: NodeContext) -> None:
            raise RuntimeError("recover broke")

    class Fine(Flaky):
        async def exec(self, prepared: Any, ctx: NodeContext) -> Any:
            return "fresh"

    flow = Flow("class-phases").node("a", Flaky).node("b", BadRecover).node("c", Fine)
    result = await FlowRuntime().run(flow.chain("a", "b", "c"))
    assert result.status == "completed", result.errors
    assert result.output("a") == "cached, posted"
    assert result.output("b") == "cached, posted"  # a failing recover is only logged
    assert result.output("c") == "fresh, posted"
    assert seen == [
        "post cached",
        "recover down",
        "post cached",
        "post fresh",
    ]


async def test_events_edge_evaluate_context_change_and_batch_index() -> None:
    from flowcraft import CollectingEventBus, Flow, FlowRuntime, NodeContext

    async def write(ctx: NodeContext) -> int:
        await ctx.set("seen", True)
        return 3

    def fail_on_two(ctx: NodeContext) -> Any:
        if ctx.input == 2:
            raise ValueError("two")
        return ctx.input

    bus = CollectingEventBus()
    flow = (
        Flow("events")
        .node("a", write)
        .node("big", lambda c: "big")
        .node("small", lambda c: [1, 2, 3])
        .batch("items", fail_on_two)
        .edge("a", "big", condition="result.output > 5")
        .edge("a", "small", condition="a <= 5")
        .edge("small", "items")
    )
    result = await FlowRuntime(event_bus=bus).run(flow)
    assert result.status == "failed"
    evaluated = [_original(e.data) for e in bus.events if e.type == "edge:evaluate"]
    assert evaluated == [
        {"source": "a", "target": "big", "condition": "result.output > 5", "result": False},
        {"source": "a", "target": "small", "condition": "a <= 5", "result": True},
    ]
    changes = [_original(e.data) for e in bus.events if e.type == "context:change"]
    assert changes == [{"key": "seen", "op": "set", "value": True, "sourceNode": "a"}]
    assert "batch:start" in bus.types("items")
    assert "item 1 failed" in result.errors[0].message


async def test_run_concurrency_caps_nodes_running_at_once() -> None:
    from flowcraft import Flow, FlowRuntime, NodeContext

    running = 0
    peak = 0

    async def work(ctx: NodeContext) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return 1

    flow = Flow("wide").node("s", lambda c: 0).node("j", lambda c: sum(c.input.values()))
    for i in range(8):
        flow.node(f"w{i}", work).chain("s", f"w{i}", "j")
    result = await FlowRuntime().run(flow, concurrency=2)
    assert result.output("j") == 8
    assert peak == 2
    with pytest.raises(ValueError, match="at least 1"):
        await FlowRuntime().run(flow, concurrency=0)


async def test_flow_batch_with_input_key_output_key_and_chunks() -> None:
    from flowcraft import Flow, FlowRuntime, NodeContext

    running = 0
    peak = 0

    async def double(ctx: NodeContext) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return int(ctx.input) * 2

    flow = (
        Flow("batched")
        .node("start", lambda c: [10, 20, 30, 40, 50])
        .node("other", lambda c: "not the list")
        .batch("double-items", double, input_key="start", output_key="doubled", chunk_size=2)
        .chain("start", "other", "double-items")
        .node("a", lambda c: 1)
        .node("b", lambda c: 2)
        .node("c", lambda c: c.input + 1)
        .edge("a", "b")
        .edge("b", "a", condition="false")
        .edge("b", "c")
        .set_cycle_entry_point("a")
    )
    blueprint = flow.to_blueprint()
    assert blueprint.metadata == {"cycleEntryPoints": ["a"]}
    result = await FlowRuntime().run(flow)
    assert result.status == "completed", result.errors
    assert result.output("double-items") == [20, 40, 60, 80, 100]
    assert result.context["doubled"] == [20, 40, 60, 80, 100]
    assert peak == 2
    assert result.output("c") == 3


def test_scope_resolution_order() -> None:
    from flowcraft._traversal import Scope
    from flowcraft.expressions import SafeEvaluator

    data = {"a": "context a", "_outputs.a": "node a", "_outputs.b": {"n": 2}, "m": 3}
    evaluator = SafeEvaluator()
    scope = Scope(data, {"input": 5})
    assert evaluator.evaluate("a", scope) == "context a"  # a context key wins
    assert evaluator.evaluate("b.n * m", scope) == 6  # a node id names its output
    assert evaluator.evaluate("input * context.m", scope) == 15
    assert evaluator.evaluate('context["b"].n === 2 && context.input == null', scope) is True
    assert evaluator.evaluate("context.a", Scope({**data, "context": {"a": 1}})) == 1
    assert "b" in scope
    assert "zzz" not in scope
    assert data == {"a": "context a", "_outputs.a": "node a", "_outputs.b": {"n": 2}, "m": 3}


def test_apply_edge_transform_with_the_analysis_edge_reads_the_target_inputs() -> None:
    from flowcraft import Flow, FlowRuntime

    flow = (
        Flow("single-step")
        .node("a", lambda c: 2)
        .node("b", lambda c: 10)
        .node("c", lambda c: c.input, inputs="a")
        .chain("a", "b")
        .edge("b", "c", transform="input + 1")
    )
    runtime = FlowRuntime()
    blueprint = runtime.blueprint(flow)
    edge = runtime.analysis(blueprint).out["b"][0]
    scope = {"_outputs.a": 2, "_outputs.b": 10}
    assert runtime.apply_edge_transform(edge, 10, scope) == 3
    assert runtime.apply_edge_transform(edge.definition, 10, scope) == 11
    node = blueprint.node("c")
    transformed = runtime.analysis(blueprint).transformed_from["c"]
    assert runtime.resolve_input(node, {"b": 3}, scope, transformed=transformed) == 3
    assert runtime.resolve_input(node, {}, scope) == 2


async def test_all_join_with_one_transformed_edge_still_gathers_every_input() -> None:
    from flowcraft import Flow, FlowRuntime

    flow = (
        Flow("join-transform")
        .node("s", lambda c: 1)
        .node("b", lambda c: 2)
        .node("c", lambda c: 3)
        .node("j", lambda c: c.input)
        .chain("s", "b")
        .chain("s", "c")
        .edge("b", "j", transform="input * 10")
        .edge("c", "j")
    )
    result = await FlowRuntime().run(flow)
    assert result.output("j") == {"b": 20, "c": 3}


async def test_the_distributed_path_emits_the_same_commit_events() -> None:
    """``context:change`` per committed write and ``edge:evaluate`` per condition, as in
    memory (issue 18 item 9), from a worker of the distributed protocol."""
    from flowcraft import CollectingEventBus, Flow, NodeContext

    async def write(ctx: NodeContext) -> int:
        await ctx.context.set("seen", True)
        return 5

    flow = (
        Flow("events")
        .node("a", write)
        .node("big", lambda c: "big")
        .node("small", lambda c: "small")
        .edge("a", "big", condition="result.output > 3")
        .edge("a", "small", condition="result.output <= 3")
    )
    bus = CollectingEventBus()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow), event_bus=bus)
    run_id = await adapter.start_run("events")
    await adapter.run_until_idle(10)
    result = await adapter.wait_for_result(run_id, 5)
    assert result.status == "completed"
    changes = [
        _original(e.data) for e in bus.events if e.type == "context:change" and e.node_id == "a"
    ]
    assert changes == [{"key": "seen", "op": "set", "value": True, "sourceNode": "a"}]
    edges = {(e.data["target"], e.data["result"]) for e in bus.events if e.type == "edge:evaluate"}
    assert edges == {("big", True), ("small", False)}
