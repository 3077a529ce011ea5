"""A commit past the store's state limit fails the run cleanly and commits nothing."""

from __future__ import annotations

import json
from collections.abc import Sequence

from flowcraft import Flow, NodeContext, RuntimeOptions, StateLimitError
from flowcraft.context import Guard, PatchOperation
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker, InMemoryRunContext


class LimitedContext(InMemoryRunContext):
    """A store that refuses any patch carrying more than 10 KB (like an item limit)."""

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        size = sum(len(json.dumps(op.value)) for op in ops if op.op == "set")
        if size > 10_000:
            raise StateLimitError(f"patch of {size} bytes exceeds the 10,000 byte limit")
        return await super().patch(ops, guard=guard)


class LimitedAdapter(InMemoryAdapter):
    def create_context(self, run_id: str) -> InMemoryRunContext:
        return LimitedContext(self.broker, run_id)


async def test_oversized_commit_fails_the_run_without_committing() -> None:
    async def big(ctx: NodeContext) -> str:
        await ctx.set("blob", "x" * 20_000)
        return "big"

    after: list[str] = []
    flow = Flow("big").node("b", big).node("next", lambda c: after.append("ran")).chain("b", "next")
    broker = InMemoryBroker()
    options = RuntimeOptions.from_flows(flow)
    adapter = LimitedAdapter(runtime_options=options, broker=broker)
    run = await adapter.start_run("big", {"small": 1})
    await adapter.run_until_idle(10)
    result = await adapter.wait_for_result(run, 1)
    assert result.status == "failed"
    assert "10,000 byte limit" in result.errors[0]["message"]
    assert result.context == {"small": 1}
    assert after == []
    assert broker.dead_letters == []
