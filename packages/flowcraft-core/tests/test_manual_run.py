"""``ManualRun``: the public handle a debugger drives a run with, one activation at
a time (``flowcraft.debug``'s stepper is built on it, not on runtime internals)."""

from __future__ import annotations

from flowcraft import Flow, FlowRuntime
from flowcraft.runtime import ManualRun


async def test_a_run_one_activation_at_a_time_then_back() -> None:
    flow = (
        Flow("manual")
        .node("a", lambda c: 1)
        .node("b", lambda c: c.input + 1)
        .node("c", lambda c: c.input * 10)
        .chain("a", "b", "c")
    )
    runtime = FlowRuntime()
    blueprint = runtime.blueprint(flow)
    run = ManualRun(runtime, blueprint, {"seed": 1}, run_id="m1")
    assert run.run_id == "m1"
    [first] = run.start
    [second] = await run.step(first)  # a chain is not fused: b is its own step
    assert second.node_id == "b"
    saved = (dict(run.context.data), run.traversal.to_state(), dict(run.waiting))
    [third] = await run.step(second)
    assert await run.step(third) == []
    assert run.context.data["_outputs.c"] == 20
    assert run.traversal.finished
    run.restore(*saved, [], False)
    assert "_outputs.c" not in run.context.data
    assert not run.traversal.finished


async def test_a_failing_node_marks_the_run_failed_instead_of_raising() -> None:
    def boom(ctx: object) -> None:
        raise RuntimeError("disk on fire")

    flow = Flow("failing").node("a", boom)
    runtime = FlowRuntime()
    run = ManualRun(runtime, runtime.blueprint(flow))
    assert await run.step(run.start[0]) == []
    assert run.failed
    assert [e.node_id for e in run.errors] == ["a"]
    assert "disk on fire" in run.errors[0].message
