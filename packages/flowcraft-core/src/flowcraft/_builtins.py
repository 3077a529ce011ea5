"""Built-in nodes: wait (human in the loop), sleep, sub-flow, batch, the loop
controller and batch scatter/gather.

They are ordinary node implementations registered under ``flowcraft:*`` keys, and
under the TypeScript flowcraft's names (``wait``, ``sleep``, ``subflow``,
``loop-controller``, ``batch-scatter``, ``batch-gather``) so its blueprints run
unchanged; a blueprint that uses them runs the same in memory and on a worker.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowcraft._analysis import analyse
from flowcraft._executor import Awaiting, NodeExecutor, Sleeping
from flowcraft._traversal import OUTPUTS_PREFIX, Scope
from flowcraft.blueprint import NodeDefinition
from flowcraft.errors import NodeExecutionError
from flowcraft.events import FlowEvent, emit
from flowcraft.node import NodeContext, NodeImplementation, NodeResult

if TYPE_CHECKING:
    from flowcraft.runtime import FlowRuntime

WAIT = "flowcraft:wait"
SLEEP = "flowcraft:sleep"
SUBFLOW = "flowcraft:subflow"
BATCH = "flowcraft:batch"
LOOP_CONTROLLER = "flowcraft:loop-controller"
BATCH_SCATTER = "flowcraft:batch-scatter"
BATCH_GATHER = "flowcraft:batch-gather"

TYPESCRIPT_NAMES: Mapping[str, str] = {
    "wait": WAIT,
    "sleep": SLEEP,
    "subflow": SUBFLOW,
    "loop-controller": LOOP_CONTROLLER,
    "batch-scatter": BATCH_SCATTER,
    "batch-gather": BATCH_GATHER,
}
"""The TypeScript flowcraft's built-in ``uses`` names, and the built-in each one is."""

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def duration_ms(value: Any, node_id: str) -> float:
    """A sleep's ``params.duration``: milliseconds, or a string such as ``'5s'``,
    ``'2m'``, ``'1h'``, ``'1d'`` (the TypeScript forms) or ``'250ms'``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"sleep node {node_id!r}: duration must be a number or a string")
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if not match:
            raise ValueError(
                f"sleep node {node_id!r}: invalid duration {value!r} (e.g. 500, '10s', '5m', '1h')"
            )
        value = float(match.group(1)) * _UNIT_MS[match.group(2) or "ms"]
    if value < 0:
        raise ValueError(f"sleep node {node_id!r}: duration must be >= 0, not {value}")
    return float(value)


def sleep_node(ctx: NodeContext) -> NodeResult:
    """Sleep ``params.duration`` (see :func:`duration_ms`), then pass the input on. The
    runtime keeps the time: in the process, or durably in the run's state."""
    return Sleeping(
        output=ctx.input, duration_ms=duration_ms(ctx.params.get("duration", 0), ctx.node_id)
    )


async def _read(ctx: NodeContext, key: str) -> Any:
    """A context key, else the output of the node with that id (the TypeScript rule)."""
    value = await ctx.context.get(key)
    if value is None:
        value = await ctx.context.get(OUTPUTS_PREFIX + key)
    return value


def builtins(runtime: FlowRuntime) -> dict[str, NodeImplementation]:
    """The built-ins, bound to the runtime that runs sub-flows and batch items."""

    async def wait_node(ctx: NodeContext) -> NodeResult:
        """Pause here until ``resume`` (or ``resume_with_action``) supplies the result,
        or, with ``params.event``, until ``signal`` names that event (correlated by
        ``params.token``, a string, or ``params.tokenFrom``, an expression over the
        context and ``input``); ``params.timeout`` (a duration) resolves it with the
        action ``timeout`` instead. The human-approval wait is the one without params."""
        params = ctx.params
        event, token = params.get("event"), params.get("token")
        timeout = params.get("timeout")
        if event is None and token is None and timeout is None and "tokenFrom" not in params:
            return Awaiting(output=ctx.input)
        if event is not None and not isinstance(event, str):
            raise ValueError(f"wait node {ctx.node_id!r}: params.event must be a string")
        source = params.get("tokenFrom")
        if isinstance(source, str):
            from flowcraft.distributed._scope import scope_keys

            found = await ctx.context.get_many(sorted(scope_keys(source)))
            value = runtime.evaluator.evaluate(source, Scope(found, {"input": ctx.input}))
            token = None if value is None else str(value)
        if token is not None and (not isinstance(token, str) or not token):
            raise ValueError(f"wait node {ctx.node_id!r}: the token must be a non-empty string")
        return Awaiting(
            output=ctx.input,
            event=event,
            token=token,
            timeout_ms=None if timeout is None else duration_ms(timeout, ctx.node_id),
        )

    async def subflow_node(ctx: NodeContext) -> Any:
        """Run ``params.blueprintId`` to completion. ``params.inputs`` maps child keys
        to parent keys or node ids; without it the node's input is the child's start
        nodes' input. The output is the child's terminal node's output (a dict by
        id when it has several), or with ``params.outputs`` (parent key to child key
        or node id) its whole final context."""
        params = ctx.params
        blueprint_id = params.get("blueprintId")
        if not isinstance(blueprint_id, str):
            raise ValueError(f"sub-flow node {ctx.node_id!r} needs params.blueprintId")
        child = runtime.blueprint(blueprint_id)
        initial: dict[str, Any] = {}
        inputs: Mapping[str, str] | None = params.get("inputs")
        for child_key, parent_key in (inputs or {}).items():
            initial[child_key] = await _read(ctx, parent_key)
        start_input = None
        if not inputs and ctx.input is not None:
            start_input = ctx.input
            initial.setdefault("input", ctx.input)
        result = await runtime.run(
            child, initial, run_id=f"{ctx.idempotency_key}:sub", input=start_input
        )
        if result.status != "completed":
            detail = "; ".join(e.message for e in result.errors) or result.status
            raise NodeExecutionError(
                f"sub-flow {blueprint_id!r} of node {ctx.node_id!r} "
                f"ended {result.status}: {detail}",
                node_id=ctx.node_id,
            )
        final = result.context
        outputs: Mapping[str, str] | None = params.get("outputs")
        if outputs:
            for parent_key, child_key in outputs.items():
                value = final.get(OUTPUTS_PREFIX + child_key)
                await ctx.context.set(parent_key, final.get(child_key) if value is None else value)
            return final
        # Its terminal nodes (no outgoing edge), as the TypeScript flowcraft picks them.
        analysis = analyse(child)
        ends = [n for n in analysis.nodes if not analysis.out[n] and n in analysis.reachable]
        if len(ends) == 1:
            return final.get(OUTPUTS_PREFIX + ends[0])
        return {n: final.get(OUTPUTS_PREFIX + n) for n in ends}

    async def run_items(
        ctx: NodeContext, worker: str, items: list[Any] | tuple[Any, ...], *, start: int = 0
    ) -> list[Any]:
        """Run ``worker`` on each item (at most ``concurrency`` at once); a failure
        names the item's index."""
        params = ctx.params
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
                try:
                    return (await executor.execute(item_def, item_ctx)).output
                except NodeExecutionError as exc:
                    raise NodeExecutionError(
                        f"batch node {ctx.node_id!r}: item {index} failed: {exc}",
                        node_id=ctx.node_id,
                        cause=exc,
                    ) from exc

        return list(await asyncio.gather(*(one(start + i, x) for i, x in enumerate(items))))

    async def run_chunked(
        ctx: NodeContext, worker: str, items: list[Any] | tuple[Any, ...]
    ) -> list[Any]:
        """``params.chunkSize`` items at a time (default: all), chunk after chunk."""
        chunk = int(ctx.params.get("chunkSize") or len(items) or 1)
        if chunk < 1:
            raise ValueError(f"batch node {ctx.node_id!r}: chunkSize must be >= 1")
        results: list[Any] = []
        for first in range(0, len(items), chunk):
            results += await run_items(ctx, worker, items[first : first + chunk], start=first)
        return results

    async def batch_node(ctx: NodeContext) -> list[Any]:
        worker = ctx.params.get("worker")
        if not isinstance(worker, str):
            raise ValueError(f"batch node {ctx.node_id!r} needs params.worker (a registry key)")
        items = ctx.input
        if not isinstance(items, list | tuple):
            raise TypeError(
                f"batch node {ctx.node_id!r} needs a list as input, got {type(items).__name__}"
            )
        await emit(
            runtime.event_bus,
            FlowEvent(
                "batch:start", ctx.run_id, ctx.node_id, {"batchId": ctx.node_id, "size": len(items)}
            ),
        )
        results = await run_chunked(ctx, worker, items)
        output_key = ctx.params.get("outputKey")
        if isinstance(output_key, str):
            await ctx.context.set(output_key, results)
        await emit(
            runtime.event_bus,
            FlowEvent(
                "batch:finish",
                ctx.run_id,
                ctx.node_id,
                {"batchId": ctx.node_id, "results": results},
            ),
        )
        return results

    async def loop_controller(ctx: NodeContext) -> NodeResult:
        """Action ``continue`` while ``params.condition`` holds over the context (where
        node ids name their outputs, and ``input`` is this node's input), else
        ``break``."""
        from flowcraft.distributed._scope import scope_keys

        condition = ctx.params.get("condition")
        if not isinstance(condition, str):
            raise ValueError(f"loop controller {ctx.node_id!r} needs params.condition")
        named = ctx.node._named_inputs if ctx.node is not None else None
        expression = named.get(condition, condition) if named else condition
        found = await ctx.context.get_many(sorted(scope_keys(expression)))
        holds = runtime.evaluator.evaluate(expression, Scope(found, {"input": ctx.input}))
        return NodeResult(output=None, action="continue" if holds else "break")

    async def batch_scatter(ctx: NodeContext) -> Any:
        """Run ``params.workerUsesKey`` on every item of the input, ``chunkSize`` at
        a time, and keep the outputs for the gather node ``params.gatherNodeId``."""
        params = ctx.params
        worker = params.get("workerUsesKey")
        gather_id = params.get("gatherNodeId")
        if not isinstance(worker, str) or not isinstance(gather_id, str):
            raise ValueError(
                f"batch-scatter node {ctx.node_id!r} needs params.workerUsesKey and "
                "params.gatherNodeId"
            )
        items = ctx.input if ctx.input is not None else []
        if not isinstance(items, list | tuple):
            raise TypeError(
                f"batch-scatter node {ctx.node_id!r} needs a list as input, "
                f"got {type(items).__name__}"
            )
        batch_id = ctx.node_id.removesuffix("_scatter")
        await emit(
            runtime.event_bus,
            FlowEvent(
                "batch:start",
                ctx.run_id,
                ctx.node_id,
                {"batchId": batch_id, "scatterNodeId": ctx.node_id, "size": len(items)},
            ),
        )
        results = await run_chunked(ctx, worker, items)
        await ctx.context.set(f"{gather_id}_results", results)
        return {"gatherNodeId": gather_id, "hasMore": False}

    async def batch_gather(ctx: NodeContext) -> Any:
        """The scatter's outputs, in item order; also kept under ``params.outputKey``
        (default: this node's id)."""
        params = ctx.params
        gather_id = params.get("gatherNodeId") or ctx.node_id
        results = await ctx.context.get(f"{gather_id}_results") or []
        await ctx.context.set(params.get("outputKey") or ctx.node_id, results)
        await ctx.context.delete(f"{gather_id}_results")
        await emit(
            runtime.event_bus,
            FlowEvent(
                "batch:finish",
                ctx.run_id,
                ctx.node_id,
                {
                    "batchId": gather_id.removesuffix("_gather"),
                    "gatherNodeId": gather_id,
                    "results": results,
                },
            ),
        )
        return results

    own: dict[str, NodeImplementation] = {
        WAIT: wait_node,
        SLEEP: sleep_node,
        SUBFLOW: subflow_node,
        BATCH: batch_node,
        LOOP_CONTROLLER: loop_controller,
        BATCH_SCATTER: batch_scatter,
        BATCH_GATHER: batch_gather,
    }
    return {**own, **{name: own[key] for name, key in TYPESCRIPT_NAMES.items()}}
