"""The TypeScript flowcraft's documented examples, as the blueprints its builder
writes (camelCase JSON, written here from its guides), run unchanged on this engine.

The declarative coffee shop, the loop counter, the batch and the sub-flow guides'
examples are scenarios of flowcraft.testing.compat (run in memory and on the
in-memory adapter by test_typescript_compat.py); these are the others.
"""

from __future__ import annotations

import json
from typing import Any

from flowcraft import FlowRuntime, NodeContext, RunStatus, WorkflowBlueprint


def _load(text: str) -> WorkflowBlueprint:
    return WorkflowBlueprint.parse(text)


GETTING_STARTED = """
{
  "id": "simple-workflow",
  "nodes": [
    {"id": "start", "uses": "startNode"},
    {"id": "pause", "uses": "sleep", "params": {"duration": 10}},
    {"id": "double", "uses": "doubleNode"}
  ],
  "edges": [
    {"source": "start", "target": "pause"},
    {"source": "pause", "target": "double"}
  ]
}
"""


async def test_getting_started() -> None:
    async def start(ctx: NodeContext) -> Any:
        return await ctx.context.get("value")

    runtime = FlowRuntime(registry={"startNode": start, "doubleNode": lambda c: c.input * 2})
    result = await runtime.run(_load(GETTING_STARTED), {"value": 42})
    # The original pauses at the sleep (a durable timer) and is resumed; here the
    # sleep waits in the run, so one call completes it.
    assert result.status is RunStatus.COMPLETED, result.errors
    assert result.context["value"] == 42
    assert result.output("start") == 42
    assert result.output("double") == 84


APPROVAL = """
{
  "id": "approval-workflow",
  "nodes": [
    {"id": "start", "uses": "start"},
    {"id": "wait-for-approval", "uses": "wait"},
    {"id": "process", "uses": "process"}
  ],
  "edges": [
    {"source": "start", "target": "wait-for-approval"},
    {"source": "wait-for-approval", "target": "process"}
  ]
}
"""

CONDITIONAL_APPROVAL = """
{
  "id": "conditional-approval",
  "nodes": [
    {"id": "start", "uses": "start"},
    {"id": "review", "uses": "wait"},
    {"id": "approve", "uses": "approve"},
    {"id": "reject", "uses": "reject"},
    {"id": "escalate", "uses": "escalate"}
  ],
  "edges": [
    {"source": "start", "target": "review"},
    {"source": "review", "target": "approve", "action": "approve"},
    {"source": "review", "target": "reject", "action": "reject"},
    {"source": "review", "target": "escalate", "action": "escalate"}
  ]
}
"""


async def test_human_in_the_loop_approval() -> None:
    registry = {
        "start": lambda c: {"user": "Alice", "amount": 1500},
        "process": lambda c: "Approved" if (c.input or {}).get("approved") else "Denied",
    }
    runtime = FlowRuntime(registry=registry)
    blueprint = _load(APPROVAL)
    paused = await runtime.run(blueprint)
    assert paused.status is RunStatus.AWAITING
    assert paused.awaiting == ["wait-for-approval"]
    state = json.loads(json.dumps(paused.state))  # kept as JSON between the two calls
    done = await runtime.resume(blueprint, state, "wait-for-approval", output={"approved": True})
    assert done.status is RunStatus.COMPLETED, done.errors
    assert done.output("process") == "Approved"


async def test_wait_resumed_with_an_action_takes_that_branch() -> None:
    registry = {
        "start": lambda c: {"item": "document.pdf"},
        "approve": lambda c: "Document approved",
        "reject": lambda c: "Document rejected",
        "escalate": lambda c: "Escalated to manager",
    }
    runtime = FlowRuntime(registry=registry)
    blueprint = _load(CONDITIONAL_APPROVAL)
    paused = await runtime.run(blueprint)
    done = await runtime.resume(
        blueprint, paused, output={"reviewer": "john@example.com"}, action="reject"
    )
    assert done.status is RunStatus.COMPLETED, done.errors
    assert done.output("reject") == "Document rejected"
    assert "_outputs.approve" not in done.context
    assert "_outputs.escalate" not in done.context


RETRY = """
{
  "id": "retry-workflow",
  "nodes": [{"id": "risky-operation", "uses": "risky", "config": {"maxRetries": 3}}]
}
"""

FALLBACK = """
{
  "id": "fallback-workflow",
  "nodes": [
    {"id": "primary-api", "uses": "primary",
     "config": {"maxRetries": 2, "fallback": "secondary-api"}},
    {"id": "secondary-api", "uses": "secondary"},
    {"id": "process-data", "uses": "process"}
  ],
  "edges": [
    {"source": "primary-api", "target": "process-data"},
    {"source": "secondary-api", "target": "process-data"}
  ]
}
"""


async def test_retries() -> None:
    attempts = 0

    def risky(ctx: NodeContext) -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RuntimeError("Temporary failure!")
        return "Succeeded on attempt 3"

    result = await FlowRuntime(registry={"risky": risky}).run(_load(RETRY))
    assert result.status is RunStatus.COMPLETED, result.errors
    assert result.output("risky-operation") == "Succeeded on attempt 3"
    assert attempts == 3


async def test_fallback_node_with_its_own_edges() -> None:
    ran: list[str] = []

    def primary(ctx: NodeContext) -> str:
        ran.append("primary")
        raise RuntimeError("Primary API is down")

    def secondary(ctx: NodeContext) -> str:
        ran.append("secondary")
        return "Data from secondary API"

    registry = {
        "primary": primary,
        "secondary": secondary,
        "process": lambda c: f"Processed: {c.input}",
    }
    result = await FlowRuntime(registry=registry).run(_load(FALLBACK))
    assert result.status is RunStatus.COMPLETED, result.errors
    assert result.output("process-data") == "Processed: Data from secondary API"
    assert ran == ["primary", "primary", "secondary"]  # not run as a start node too


CYCLE_ENTRY = """
{
  "id": "ping-pong",
  "nodes": [{"id": "ping", "uses": "ping"}, {"id": "pong", "uses": "pong"},
            {"id": "end", "uses": "end"}],
  "edges": [
    {"source": "ping", "target": "pong"},
    {"source": "pong", "target": "ping", "condition": "pong < 3"},
    {"source": "pong", "target": "end", "condition": "pong >= 3"}
  ],
  "metadata": {"cycleEntryPoints": ["ping"]}
}
"""


async def test_cycle_entry_point_starts_a_graph_with_no_start_node() -> None:
    async def ping(ctx: NodeContext) -> int:
        return (await ctx.context.get("pong") or 0) + 1

    registry = {"ping": ping, "pong": lambda c: c.input, "end": lambda c: f"done at {c.input}"}
    result = await FlowRuntime(registry=registry).run(_load(CYCLE_ENTRY))
    assert result.status is RunStatus.COMPLETED, result.errors
    assert result.output("end") == "done at 3"
