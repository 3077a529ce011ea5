"""A worker that dies while tidying a finished run leaves no counter behind."""

from __future__ import annotations

from flowcraft import Flow, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker


async def test_crash_during_cleanup_is_finished_by_the_redelivery() -> None:
    flow = Flow("f").node("s", lambda c: 1).node("j", lambda c: c.input)
    for i in range(2):
        flow.node(f"b{i}", lambda c: 1).edge("s", f"b{i}").edge(f"b{i}", "j")
    broker = InMemoryBroker()
    options = RuntimeOptions.from_flows(flow)
    adapter = InMemoryAdapter(runtime_options=options, broker=broker)
    store = broker.store
    delete = store.delete
    died: list[str] = []

    async def dying_delete(key: str) -> None:
        if ":join:" in key and not died:
            died.append(key)
            raise ConnectionError("the worker dies while tidying")
        await delete(key)

    store.delete = dying_delete  # type: ignore[method-assign]
    run = await adapter.start_run("f")
    await adapter.run_until_idle(10)
    assert died, "the crash was injected"
    result = await adapter.wait_for_result(run, 1)
    assert result.status == "completed"
    assert [k for k in store.snapshot() if ":join:" in k or ":end:" in k] == []
    assert len(broker.results.get(run, [])) >= 1
