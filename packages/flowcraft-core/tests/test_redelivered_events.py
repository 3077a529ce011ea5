"""A redelivered job whose activation resolved emits that resolution again from the run's
state, even when the run has ended meanwhile: the worker that resolved it may have died
before its events left it while another path (a redelivery of the next node, the
reconciler) finished the run. Run history keeps each event once."""

from __future__ import annotations

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.events import CollectingEventBus


async def _out(ctx: NodeContext) -> str:
    return f"out of {ctx.node_id}"


async def test_a_job_of_an_ended_run_emits_the_resolution_it_finds() -> None:
    flow = Flow("pair").node("a", _out).node("b", _out).edge("a", "b")
    bus = CollectingEventBus()
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(
        runtime_options=RuntimeOptions.from_flows(flow, event_bus=bus), broker=broker
    )
    run_id = await adapter.start_run("pair", run_id="ended")
    deliveries = []
    while not broker.queue.empty():
        delivery = broker.queue.get_nowait()
        deliveries.append(delivery)
        await adapter.deliver(adapter.handle_job, delivery)
    result = await adapter.get_final_result(run_id)
    assert result is not None
    assert result.status == "completed"
    (first,) = [d for d in deliveries if d.job.node_id == "a"]
    bus.events.clear()

    await adapter.deliver(adapter.handle_job, first)  # a late copy of a's job

    finishes = [e for e in bus.events if e.type == "node:finish"]
    assert [(e.node_id, e.data.get("activation"), e.data.get("output")) for e in finishes] == [
        ("a", 1, "out of a")
    ]
    assert finishes[0].data.get("redelivered") is True
    assert not [e for e in bus.events if e.type in ("node:start", "workflow:finish")]


async def test_without_a_bus_a_job_of_an_ended_run_reads_nothing_more() -> None:
    """The extra read is paid only where someone listens."""
    flow = Flow("one").node("a", _out)
    broker = InMemoryBroker()
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow), broker=broker)
    await adapter.start_run("one", run_id="quiet")
    delivery = broker.queue.get_nowait()
    await adapter.deliver(adapter.handle_job, delivery)
    broker.reset_counts()
    await adapter.deliver(adapter.handle_job, delivery)
    assert sum(broker.context_ops.values()) <= 1, broker.context_ops
