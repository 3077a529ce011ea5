"""The analysis library API, the stepper, the trace, and the pause event (issue 18)."""

from __future__ import annotations

import io
from typing import Any

from flowcraft import CollectingEventBus, Flow, FlowRuntime, NodeContext
from flowcraft.analysis import (
    analyze_blueprint,
    check_for_cycles,
    generate_mermaid,
    generate_mermaid_for_run,
    lint_blueprint,
)
from flowcraft.debug import create_stepper, run_with_trace

DIAMOND: dict[str, Any] = {
    "id": "diamond",
    "nodes": [
        {"id": "a", "uses": "fn"},
        {"id": "b", "uses": "fn"},
        {"id": "c", "uses": "fn"},
        {"id": "d", "uses": "fn"},
    ],
    "edges": [
        {"source": "a", "target": "b"},
        {"source": "a", "target": "c"},
        {"source": "b", "target": "d"},
        {"source": "c", "target": "d"},
    ],
}


def test_analyze_blueprint_and_cycles() -> None:
    shape = analyze_blueprint(DIAMOND)
    assert shape.to_json_dict() == {
        "cycles": [],
        "startNodeIds": ["a"],
        "terminalNodeIds": ["d"],
        "nodeCount": 4,
        "edgeCount": 4,
        "isDag": True,
    }
    looped = {
        **DIAMOND,
        "edges": [*DIAMOND["edges"], {"source": "d", "target": "b", "condition": "x"}],
    }
    assert check_for_cycles(looped) == [["b", "d", "b"]]
    assert analyze_blueprint(looped).is_dag is False


def test_lint_blueprint_names_each_problem() -> None:
    bad = {
        "id": "bad",
        "nodes": [
            {"id": "a", "uses": "fn"},
            {"id": "b", "uses": "missing"},
            {"id": "lonely", "uses": "fn"},
            {"id": "island", "uses": "fn"},
            {"id": "s", "uses": "subflow", "params": {"blueprintId": "nowhere"}},
            {
                "id": "sc",
                "uses": "batch-scatter",
                "params": {"workerUsesKey": "nope", "gatherNodeId": "g"},
            },
        ],
        "edges": [
            {"source": "a", "target": "b"},
            {"source": "a", "target": "ghost"},
            {"source": "lonely", "target": "island"},
            {"source": "island", "target": "lonely"},
            {"source": "b", "target": "s"},
            {"source": "s", "target": "sc"},
        ],
    }
    result = lint_blueprint(bad, {"fn": object()})
    codes = sorted((i.code, i.node_id) for i in result.issues)
    assert result.is_valid is False
    assert codes == [
        ("INVALID_BATCH_WORKER_KEY", "sc"),
        ("INVALID_EDGE_TARGET", "ghost"),
        ("INVALID_SUBFLOW_BLUEPRINT_ID", "s"),
        ("MISSING_NODE_IMPLEMENTATION", "b"),
        ("ORPHAN_NODE", "island"),
        ("ORPHAN_NODE", "lonely"),
    ]
    assert lint_blueprint(DIAMOND, ["fn"]).to_json_dict() == {"isValid": True, "issues": []}


async def test_mermaid_for_a_run_highlights_its_path() -> None:
    bus = CollectingEventBus()
    flow = (
        Flow("path")
        .node("a", lambda c: 1)
        .node("yes", lambda c: "y")
        .node("no", lambda c: "n")
        .edge("a", "yes", condition="result.output == 1")
        .edge("a", "no", condition="result.output != 1")
    )
    await FlowRuntime(event_bus=bus).run(flow)
    text = generate_mermaid_for_run(flow, bus.events)
    assert text.startswith(generate_mermaid(flow))
    assert "    class n0,n1 completed" in text
    assert "    class n2 skipped" in text
    assert "    linkStyle 0 stroke:#28a745,stroke-width:3px" in text


async def test_stepper_runs_one_layer_per_step_and_steps_back() -> None:
    async def count(ctx: NodeContext) -> int:
        n = (await ctx.get("n") or 0) + 1
        await ctx.set("n", n)
        return n

    flow = Flow("steps").node("a", count).node("b", count).node("c", count).chain("a", "b", "c")
    stepper = await create_stepper(FlowRuntime(), flow, {"n": 0})
    assert stepper.ready == ["a"]
    first = await stepper.next()
    assert first is not None
    assert first.status == "stalled"
    assert first.context["n"] == 1
    assert stepper.ready == ["b"]
    await stepper.next()
    back = stepper.prev()
    assert back is not None
    assert back.context["n"] == 1
    assert stepper.ready == ["b"]
    await stepper.next()
    last = await stepper.next()
    assert last is not None
    assert last.status == "completed"
    assert last.output("c") == 3
    assert stepper.is_done()
    assert await stepper.next() is None
    stepper.reset()
    assert stepper.ready == ["a"]
    assert stepper.result().context == {"n": 0}


async def test_run_with_trace_prints_a_failed_runs_events() -> None:
    def boom(ctx: NodeContext) -> None:
        raise RuntimeError("kaput")

    own = CollectingEventBus()
    runtime = FlowRuntime(event_bus=own)
    flow = Flow("traced").node("a", lambda c: 1).node("b", boom).chain("a", "b")
    out = io.StringIO()
    result = await run_with_trace(runtime, flow, out=out)
    assert result.status == "failed"
    text = out.getvalue()
    assert "ended failed" in text
    assert "node:error b" in text
    assert "kaput" in text
    assert "node:error" in own.types()  # the runtime's own bus still heard it
    quiet = io.StringIO()
    ok = await run_with_trace(runtime, Flow("fine").node("x", lambda c: 1), out=quiet, always=False)
    assert ok.status == "completed"
    assert quiet.getvalue() == ""


async def test_workflow_pause_on_a_wait() -> None:
    bus = CollectingEventBus()
    flow = Flow("pausing").node("a", lambda c: 1).wait("approval").chain("a", "approval")
    result = await FlowRuntime(event_bus=bus).run(flow)
    assert result.status == "awaiting"
    pause = [e for e in bus.events if e.type == "workflow:pause"]
    assert [e.data for e in pause] == [{"awaiting": ["approval"]}]
