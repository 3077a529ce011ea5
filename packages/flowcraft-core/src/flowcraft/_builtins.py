"""Built-in nodes: wait (human in the loop), sleep, sub-flow and batch.

They are ordinary node implementations registered under ``flowcraft:*`` keys, so
a blueprint that uses them runs the same in memory and on a worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowcraft._executor import Awaiting, NodeExecutor
from flowcraft.blueprint import NodeDefinition
from flowcraft.errors import NodeExecutionError
from flowcraft.node import NodeContext, NodeImplementation, NodeResult

if TYPE_CHECKING:
    from flowcraft.runtime import FlowRuntime

WAIT = "flowcraft:wait"
SLEEP = "flowcraft:sleep"
SUBFLOW = "flowcraft:subflow"
BATCH = "flowcraft:batch"


async def wait_node(ctx: NodeContext) -> NodeResult:
    """Pause here until ``resume`` (or ``resume_with_action``) supplies the result."""
    return Awaiting(output=ctx.input)


async def sleep_node(ctx: NodeContext) -> Any:
    """Sleep ``params.duration`` milliseconds, then pass the input on."""
    duration = float(ctx.params.get("duration", 0))
    if duration < 0:
        raise ValueError(f"sleep node {ctx.node_id!r}: duration must be >= 0, not {duration}")
    await asyncio.sleep(duration / 1000)
    return ctx.input


def builtins(runtime: FlowRuntime) -> dict[str, NodeImplementation]:
    """The built-ins, bound to the runtime that runs sub-flows and batch items."""

    async def subflow_node(ctx: NodeContext) -> Any:
        params = ctx.params
        blueprint_id = params.get("blueprintId")
        if not isinstance(blueprint_id, str):
            raise ValueError(f"sub-flow node {ctx.node_id!r} needs params.blueprintId")
        initial: dict[str, Any] = {}
        for child_key, parent_key in (params.get("inputs") or {}).items():
            initial[child_key] = await ctx.context.get(parent_key)
        if ctx.input is not None and "input" not in initial:
            initial["input"] = ctx.input
        result = await runtime.run(blueprint_id, initial, run_id=f"{ctx.idempotency_key}:sub")
        if result.status != "completed":
            detail = "; ".join(e.message for e in result.errors) or result.status
            raise NodeExecutionError(
                f"sub-flow {blueprint_id!r} of node {ctx.node_id!r} "
                f"ended {result.status}: {detail}",
                node_id=ctx.node_id,
            )
        outputs: Mapping[str, str] | None = params.get("outputs")
        if outputs:
            for parent_key, child_key in outputs.items():
                await ctx.context.set(parent_key, result.context.get(child_key))
        return result.context

    async def batch_node(ctx: NodeContext) -> list[Any]:
        params = ctx.params
        worker = params.get("worker")
        if not isinstance(worker, str):
            raise ValueError(f"batch node {ctx.node_id!r} needs params.worker (a registry key)")
        items = ctx.input
        if not isinstance(items, list | tuple):
            raise TypeError(
                f"batch node {ctx.node_id!r} needs a list as input, got {type(items).__name__}"
            )
        limit = asyncio.Semaphore(int(params.get("concurrency") or 16))
        executor: NodeExecutor = runtime.executor
        item_def = NodeDefinition(
            id=f"{ctx.node_id}[item]", uses=worker, params=params.get("params")
        )

        async def one(index: int, item: Any) -> Any:
            async with limit:
                item_ctx = NodeContext(
                    ctx.context,
                    item,
                    item_def.params or {},
                    ctx.dependencies,
                    ctx.run_id,
                    f"{ctx.node_id}[{index}]",
                    1,
                    ctx.activation,
                    ctx.cancelled,
                    item_def,
                )
                return (await executor.execute(item_def, item_ctx)).output

        return list(await asyncio.gather(*(one(i, x) for i, x in enumerate(items))))

    return {WAIT: wait_node, SLEEP: sleep_node, SUBFLOW: subflow_node, BATCH: batch_node}
