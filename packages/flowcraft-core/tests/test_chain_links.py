"""Plain chain links run one after another without an activation record each: the
unusual cases in the middle of a long chain keep the ordinary rules."""

import asyncio
from typing import Any

from flowcraft import Flow, FlowRuntime, NodeContext, RunStatus

LENGTH = 30


def chain(special: int, fn: Any) -> Flow:
    """n0 -> ... -> n{LENGTH-1}; every node adds 1 to its input, except ``special``."""

    async def inc(ctx: NodeContext) -> int:
        return int(ctx.input or 0) + 1

    flow = Flow("links").node("n0", inc)
    for i in range(1, LENGTH):
        flow.node(f"n{i}", fn if i == special else inc).edge(f"n{i - 1}", f"n{i}")
    return flow


async def test_a_context_write_in_the_middle_is_committed_and_the_chain_goes_on() -> None:
    async def write(ctx: NodeContext) -> int:
        await ctx.set("seen", ctx.input)
        assert ctx.node_id == "n12"
        return int(ctx.input) + 100

    result = await FlowRuntime().run(chain(12, write))
    assert result.status is RunStatus.COMPLETED
    assert result.context["seen"] == 12
    assert result.output("n11") == 12
    assert result.output("n12") == 112
    assert result.output(f"n{LENGTH - 1}") == 112 + LENGTH - 13


async def test_a_failure_in_the_middle_names_that_node_and_stops_the_chain() -> None:
    def boom(ctx: NodeContext) -> int:
        raise ValueError("no")

    result = await FlowRuntime().run(chain(17, boom))
    assert result.status is RunStatus.FAILED
    assert [e.node_id for e in result.errors] == ["n17"]
    assert result.output("n16") == 17
    assert "_outputs.n17" not in result.context
    assert "_outputs.n18" not in result.context


async def test_strict_mode_names_the_link_whose_output_is_not_json() -> None:
    result = await FlowRuntime(strict=True).run(chain(9, lambda c: {1, 2}))
    assert result.status is RunStatus.FAILED
    assert [e.node_id for e in result.errors] == ["n9"]
    assert "JSON" in result.errors[0].message
    assert result.output("n8") == 9


async def test_a_wait_in_the_middle_pauses_and_resumes_with_its_predecessor_input() -> None:
    flow = Flow("links-wait")

    async def inc(ctx: NodeContext) -> int:
        return int(ctx.input or 0) + 1

    flow.node("n0", inc)
    for i in range(1, LENGTH):
        if i == 20:
            flow.wait(f"n{i}")
        else:
            flow.node(f"n{i}", inc)
        flow.edge(f"n{i - 1}", f"n{i}")
    runtime = FlowRuntime()
    paused = await runtime.run(flow)
    assert paused.status is RunStatus.AWAITING
    assert paused.awaiting == ["n20"]
    assert paused.output("n19") == 20
    assert paused.state is not None
    assert paused.state["waiting"] == [["n20", 1, {"n19": 20}]]
    done = await runtime.resume(flow, paused, output=1000)
    assert done.status is RunStatus.COMPLETED
    assert done.output(f"n{LENGTH - 1}") == 1000 + LENGTH - 21


async def test_cancelling_from_inside_a_link_stops_before_the_next_link() -> None:
    cancel = asyncio.Event()

    def stop(ctx: NodeContext) -> int:
        cancel.set()
        return 0

    result = await FlowRuntime().run(chain(5, stop), cancel=cancel)
    assert result.status is RunStatus.CANCELLED
    assert result.output("n5") == 0
    assert "_outputs.n6" not in result.context


async def test_links_inside_a_loop_keep_their_iteration() -> None:
    seen: list[tuple[str, int]] = []

    def record(name: str) -> Any:
        def fn(ctx: NodeContext) -> int:
            seen.append((name, ctx.activation))
            return int(ctx.input or 0) + 1

        return fn

    flow = Flow("loop-links").node("start", lambda c: 0)
    for name in ("a", "b", "c"):
        flow.node(name, record(name))
    flow.node("done", lambda c: c.input)
    flow.chain("start", "a", "b", "c")
    flow.edge("c", "a", condition="_outputs.c < 9").edge("c", "done", condition="_outputs.c >= 9")
    result = await FlowRuntime().run(flow)
    assert result.status is RunStatus.COMPLETED
    assert result.output("done") == 9
    assert seen == [(n, k) for k in (1, 2, 3) for n in ("a", "b", "c")]
