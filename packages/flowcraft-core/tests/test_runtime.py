"""The in-memory runtime: every feature, asserted on real runs."""

import asyncio
from typing import Any

import pytest

from flowcraft import (
    BaseNode,
    CollectingEventBus,
    Flow,
    FlowRuntime,
    Middleware,
    NodeContext,
    NodeResult,
    RunStatus,
    RuntimeOptions,
    UnknownBlueprintError,
    UnknownNodeError,
    WorkflowBlueprint,
)


async def one(ctx: NodeContext) -> int:
    return 1


async def inc(ctx: NodeContext) -> int:
    return int(ctx.input) + 1


async def echo(ctx: NodeContext) -> Any:
    return ctx.input


async def test_linear_chain_passes_outputs() -> None:
    flow = Flow("chain").node("a", one).node("b", inc).node("c", inc).chain("a", "b", "c")
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert [result.output(n) for n in "abc"] == [1, 2, 3]
    assert result.errors == []


async def test_sync_functions_and_plain_values() -> None:
    flow = Flow("sync").node("a", lambda ctx: {"x": 1}).node("b", lambda ctx: ctx.input["x"] * 5)
    flow.chain("a", "b")
    result = await FlowRuntime().run(flow)
    assert result.output("b") == 5


async def test_conditions_route_and_untaken_branch_does_not_block_join() -> None:
    seen: list[str] = []

    async def mark(ctx: NodeContext) -> str:
        seen.append(ctx.node_id)
        return ctx.node_id

    flow = (
        Flow("cond")
        .node("start", lambda ctx: {"amount": 500})
        .node("high", mark)
        .node("low", mark)
        .node("join", mark)
        .edge("start", "high", condition="result.output.amount > 100")
        .edge("start", "low", condition="result.output.amount <= 100")
        .edge("high", "join")
        .edge("low", "join")
    )
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert seen == ["high", "join"]
    assert "_outputs.low" not in result.context


async def test_conditions_see_context_keys_and_js_spellings() -> None:
    flow = (
        Flow("js")
        .node("a", one)
        .node("yes", lambda ctx: "yes")
        .node("no", lambda ctx: "no")
        .edge("a", "yes", condition="tier === 'gold' && result.output == 1")
        .edge("a", "no", condition="!(tier === 'gold')")
    )
    result = await FlowRuntime().run(flow, {"tier": "gold"})
    assert result.output("yes") == "yes"
    assert "_outputs.no" not in result.context


async def test_actions_select_edges_and_default_edge_is_fallback_route() -> None:
    async def decide(ctx: NodeContext) -> NodeResult:
        return NodeResult(output=ctx.input, action=ctx.input)

    def build() -> Flow:
        return (
            Flow("act")
            .node("d", decide, inputs="choice")
            .node("approve", lambda c: "A")
            .node("reject", lambda c: "R")
            .node("other", lambda c: "O")
            .edge("d", "approve", action="approve")
            .edge("d", "reject", action="reject")
            .edge("d", "other")
        )

    ran = await FlowRuntime().run(build(), {"choice": "approve"})
    assert ran.output("approve") == "A"
    assert "_outputs.other" not in ran.context
    ran = await FlowRuntime().run(build(), {"choice": "unknown"})
    assert ran.output("other") == "O"
    assert "_outputs.approve" not in ran.context


async def test_fan_out_all_join_gets_every_branch() -> None:
    flow = Flow("fan").node("s", one).node("j", echo)
    for i in range(5):
        flow.node(f"b{i}", inc).edge("s", f"b{i}").edge(f"b{i}", "j")
    result = await FlowRuntime().run(flow)
    assert result.output("j") == {f"b{i}": 2 for i in range(5)}


async def test_any_join_runs_once_on_first_branch() -> None:
    runs: list[Any] = []

    async def slow(ctx: NodeContext) -> str:
        await asyncio.sleep(0.05)
        return "slow"

    async def join(ctx: NodeContext) -> Any:
        runs.append(ctx.input)
        return ctx.input

    flow = (
        Flow("any")
        .node("s", one)
        .node("fast", lambda c: "fast")
        .node("slow", slow)
        .node("j", join, join_strategy="any")
        .edge("s", "fast")
        .edge("s", "slow")
        .edge("fast", "j")
        .edge("slow", "j")
    )
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert runs == ["fast"]
    assert result.output("slow") == "slow"  # the other branch still finished


async def test_edge_transform_and_inputs_mapping() -> None:
    flow = (
        Flow("xf")
        .node("a", lambda c: {"items": [1, 2, 3], "user": "ann"})
        .node("b", lambda c: sum(c.input))
        .node("c", lambda c: c.input, inputs={"who": "_outputs.a.user", "n": "factor"})
        .edge("a", "b", transform="input.items")
        .edge("b", "c")
    )
    result = await FlowRuntime().run(flow, {"factor": 7})
    assert result.output("b") == 6
    assert result.output("c") == {"who": "ann", "n": 7}


async def test_loop_runs_once_per_iteration_then_exits() -> None:
    keys: list[str] = []

    async def body(ctx: NodeContext) -> int:
        keys.append(ctx.idempotency_key)
        n = (await ctx.get("n") or 0) + 1
        await ctx.set("n", n)
        return n

    flow = (
        Flow("loop")
        .node("init", one)
        .node("body", body)
        .node("check", echo)
        .node("after", lambda c: f"done after {c.input}")
        .chain("init", "body", "check")
        .loop("body", "check", while_="n < 4")
        .edge("check", "after")
    )
    result = await FlowRuntime().run(flow, run_id="r1")
    assert result.status is RunStatus.COMPLETED
    assert result.context["n"] == 4
    assert keys == [f"r1:body:{i}" for i in range(1, 5)]
    assert result.output("after") == "done after 4"


async def test_retries_then_success_with_deltas_of_failed_attempts_discarded() -> None:
    attempts: list[int] = []

    async def flaky(ctx: NodeContext) -> str:
        attempts.append(ctx.attempt)
        await ctx.set(f"attempt{ctx.attempt}", True)
        if ctx.attempt < 3:
            raise RuntimeError("transient")
        return "ok"

    flow = Flow("retry").node("f", flaky, max_retries=3, retry_delay=1)
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert attempts == [1, 2, 3]
    assert "attempt1" not in result.context
    assert result.context["attempt3"] is True


async def test_failure_fails_run_once_and_stops_successors() -> None:
    ran: list[str] = []

    async def boom(ctx: NodeContext) -> None:
        raise ValueError("bad data")

    flow = Flow("fail").node("a", boom, max_retries=2).node("b", lambda c: ran.append("b"))
    flow.chain("a", "b")
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.FAILED
    assert len(result.errors) == 1
    assert result.errors[0].node_id == "a"
    assert "bad data" in result.errors[0].message
    assert ran == []


async def test_fallback_node_supplies_output() -> None:
    async def boom(ctx: NodeContext) -> None:
        raise ConnectionError("down")

    flow = (
        Flow("fb")
        .node("fetch", boom, max_retries=2, fallback="cached")
        .node("cached", lambda c: "from cache")
        .node("use", echo)
        .chain("fetch", "use")
    )
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert result.output("use") == "from cache"
    assert "_outputs.cached" not in result.context  # a fallback-only node is not a start node


class Greeter(BaseNode):
    calls = 0

    async def prep(self, ctx: NodeContext) -> str:
        return str(self.params["name"])

    async def exec(self, prepared: Any, ctx: NodeContext) -> str:
        Greeter.calls += 1
        if Greeter.calls < 2:
            raise RuntimeError("first time fails")
        return f"hello {prepared}"

    async def post(self, result: Any, ctx: NodeContext) -> NodeResult:
        return NodeResult(output=result, action="greeted")


class Fragile(BaseNode):
    async def exec(self, prepared: Any, ctx: NodeContext) -> str:
        raise RuntimeError("always")

    async def fallback(self, error: BaseException, ctx: NodeContext) -> str:
        return f"recovered from {error}"


async def test_class_nodes_prep_exec_post_and_fallback() -> None:
    Greeter.calls = 0
    flow = (
        Flow("cls")
        .node("g", Greeter, params={"name": "ann"}, max_retries=2)
        .node("f", Fragile)
        .node("next", echo)
        .edge("g", "f", action="greeted")
        .edge("f", "next")
    )
    result = await FlowRuntime().run(flow)
    assert result.output("g") == "hello ann"
    assert result.output("next") == "recovered from always"


async def test_timeout_fails_the_attempt() -> None:
    async def slow(ctx: NodeContext) -> None:
        await asyncio.sleep(5)

    flow = Flow("slow").node("s", slow, timeout=20)
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.FAILED
    assert result.errors[0].type == "NodeTimeoutError"
    assert "timed out after 20 ms" in result.errors[0].message


async def test_wait_then_resume_with_action() -> None:
    flow = (
        Flow("approval")
        .node("draft", lambda c: "draft text")
        .wait("review")
        .node("publish", lambda c: f"published: {c.input}")
        .node("discard", lambda c: "discarded")
        .chain("draft", "review")
        .edge("review", "publish", action="approve")
        .edge("review", "discard", action="reject")
    )
    runtime = FlowRuntime()
    paused = await runtime.run(flow)
    assert paused.status is RunStatus.AWAITING
    assert paused.awaiting == ["review"]
    assert "_outputs.publish" not in paused.context
    # the state is plain JSON: it can be stored and resumed by another process
    import json

    state = json.loads(json.dumps(paused.state))
    done = await FlowRuntime().resume(flow, state, output="final text", action="approve")
    assert done.status is RunStatus.COMPLETED
    assert done.output("publish") == "published: final text"
    assert "_outputs.discard" not in done.context
    assert done.run_id == paused.run_id


async def test_sleep_subflow_and_batch() -> None:
    child = Flow("child").node("double", lambda c: c.input * 2, inputs="input")
    parent = (
        Flow("parent")
        .node("n", lambda c: 21)
        .sleep("pause", 5)
        .subflow("sub", "child", outputs={"doubled": "_outputs.double"})
        .node("items", lambda c: [1, 2, 3])
        .batch("squares", lambda c: c.input * c.input, concurrency=2)
        .chain("n", "pause", "sub", "items", "squares")
    )
    runtime = FlowRuntime()
    runtime.blueprint(child)
    result = await runtime.run(parent)
    assert result.status is RunStatus.COMPLETED, result.errors
    assert result.output("pause") == 21
    assert result.context["doubled"] == 42
    assert result.output("squares") == [1, 4, 9]


async def test_dynamic_nodes_run_before_successors() -> None:
    from flowcraft import NodeDefinition

    async def scatter(ctx: NodeContext) -> NodeResult:
        return NodeResult(
            output=10,
            dynamic_nodes=[
                NodeDefinition(id=f"part{i}", uses="part", params={"i": i}) for i in range(3)
            ],
        )

    async def part(ctx: NodeContext) -> int:
        return int(ctx.input) + int(ctx.params["i"])

    async def gather(ctx: NodeContext) -> list[int]:
        return [await ctx.get(f"_outputs.part{i}") for i in range(3)]

    flow = Flow("dyn").node("scatter", scatter).node("gather", gather).chain("scatter", "gather")
    runtime = FlowRuntime(registry={"part": part})
    result = await runtime.run(flow)
    assert result.output("gather") == [10, 11, 12]


async def test_cancellation_stops_the_run() -> None:
    cancel = asyncio.Event()
    started = asyncio.Event()

    async def long(ctx: NodeContext) -> None:
        started.set()
        await asyncio.sleep(10)

    flow = Flow("cancel").node("long", long)
    task = asyncio.create_task(FlowRuntime().run(flow, cancel=cancel))
    await started.wait()
    cancel.set()
    result = await asyncio.wait_for(task, 2)
    assert result.status is RunStatus.CANCELLED


async def test_middleware_and_events() -> None:
    order: list[str] = []

    class Trace(Middleware):
        async def before(self, ctx: NodeContext) -> None:
            order.append(f"before:{ctx.node_id}")

        async def around(self, ctx: NodeContext, call_next):  # type: ignore[no-untyped-def]
            order.append(f"around:{ctx.node_id}")
            return await call_next()

        async def after(self, ctx: NodeContext, result: NodeResult) -> None:
            order.append(f"after:{ctx.node_id}={result.output}")

    bus = CollectingEventBus()
    flow = Flow("mw").node("a", one).node("b", inc).chain("a", "b")
    await FlowRuntime(middleware=[Trace()], event_bus=bus).run(flow)
    assert order == ["before:a", "around:a", "after:a=1", "before:b", "around:b", "after:b=2"]
    assert bus.types() == [
        "workflow:start",
        "node:start",
        "node:finish",
        "node:start",
        "node:finish",
        "workflow:finish",
    ]


async def test_unknown_uses_and_blueprint_are_clear_errors() -> None:
    bp = WorkflowBlueprint.parse({"id": "x", "nodes": [{"id": "a", "uses": "nope"}]})
    with pytest.raises(UnknownNodeError, match="'a' uses 'nope'"):
        await FlowRuntime().run(bp)
    with pytest.raises(UnknownBlueprintError, match="'missing'"):
        await FlowRuntime().run("missing")


async def test_condition_error_fails_run_with_clear_message() -> None:
    flow = Flow("badcond").node("a", one).node("b", one).edge("a", "b", condition="missing.x > 1")
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.FAILED
    assert "condition of edge 'a' -> 'b'" in result.errors[0].message


async def test_strict_mode_rejects_unserializable_output() -> None:
    flow = Flow("strict").node("a", lambda c: object())
    result = await FlowRuntime(strict=True).run(flow)
    assert result.status is RunStatus.FAILED
    assert "JSON" in result.errors[0].message


async def test_dependencies_reach_nodes() -> None:
    flow = Flow("deps").node("a", lambda c: c.dependencies["db"].upper())
    result = await FlowRuntime(dependencies={"db": "postgres"}).run(flow)
    assert result.output("a") == "POSTGRES"


async def test_concurrent_runs_are_isolated() -> None:
    async def remember(ctx: NodeContext) -> Any:
        await ctx.set("me", ctx.run_id)
        await asyncio.sleep(0)
        return await ctx.get("me")

    flow = Flow("iso").node("a", remember).node("b", remember).chain("a", "b")
    runtime = FlowRuntime()
    results = await asyncio.gather(*(runtime.run(flow, run_id=f"r{i}") for i in range(50)))
    assert all(r.output("b") == r.run_id for r in results)


async def test_large_chain_has_no_step_cap() -> None:
    n = 20_000
    flow = Flow("long").node("n0", one)
    for i in range(1, n):
        flow.node(f"n{i}", inc)
    flow.chain(*(f"n{i}" for i in range(n)))
    result = await FlowRuntime().run(flow)
    assert result.output(f"n{n - 1}") == n


async def test_flows_sharing_node_ids_keep_their_own_callables() -> None:
    child = Flow("child").node("work", lambda c: "child")
    parent = (
        Flow("parent")
        .node("work", lambda c: "parent")
        .subflow("call", "child")
        .chain("work", "call")
    )
    runtime = FlowRuntime()
    runtime.blueprint(child)
    result = await runtime.run(parent)
    assert result.output("work") == "parent"
    assert result.output("call") == "child"  # the child's terminal output


async def test_interrupts_are_not_retried() -> None:
    calls: list[int] = []

    async def interrupted(ctx: NodeContext) -> None:
        calls.append(ctx.attempt)
        raise KeyboardInterrupt

    flow = Flow("interrupt").node("a", interrupted, max_retries=3)
    with pytest.raises(KeyboardInterrupt):
        await FlowRuntime().run(flow)
    assert calls == [1]


async def test_runtime_options_from_flows_hold_their_functions_and_blueprints() -> None:
    a = Flow("a").node("x", one).node("y", inc).chain("x", "y")
    b = Flow("b").node("x", lambda c: "b's own x")
    options = RuntimeOptions.from_flows(a, b, strict=True)
    assert sorted(options.blueprints) == ["a", "b"]
    assert options.strict is True
    runtime = FlowRuntime(options)
    assert (await runtime.run("a")).output("y") == 2
    assert (await runtime.run("b")).output("x") == "b's own x"
    with pytest.raises(ValueError, match="two flows have the id 'a'"):
        RuntimeOptions.from_flows(a, Flow("a").node("z", one))
