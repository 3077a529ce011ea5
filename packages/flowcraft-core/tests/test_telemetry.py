"""flowcraft.telemetry: a diamond run whose jobs alternate between two workers gives one
connected trace (a span per node job, the run's trace id on both workers) and the
metrics of what happened."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from flowcraft import Flow, NodeContext
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.runtime import RuntimeOptions
from flowcraft.telemetry import Telemetry, run_trace_context

_SEED_FIELDS = ("runId", "blueprintId", "nodeId", "attempt", "isLastAttempt")


async def _step(ctx: NodeContext) -> str:
    return ctx.node_id


async def _flaky(ctx: NodeContext) -> str:
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "ok"


def _diamond() -> Flow:
    flow = Flow("diamond").node("s", _step).node("a", _flaky, max_retries=2).node("b", _step)
    return flow.node("j", _step).edge("s", "a").edge("s", "b").edge("a", "j").edge("b", "j")


def _sums(reader: InMemoryMetricReader) -> dict[tuple[str, tuple[tuple[str, Any], ...]], float]:
    found: dict[tuple[str, tuple[tuple[str, Any], ...]], float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    keep = tuple(
                        sorted(
                            (k, v)
                            for k, v in (point.attributes or {}).items()
                            if k in ("outcome", "status", "flowcraft.worker")
                        )
                    )
                    # a counter's value, or how many values a histogram recorded
                    value = float(getattr(point, "value", getattr(point, "count", 0)))
                    found[(metric.name, keep)] = found.get((metric.name, keep), 0) + value
    return found


async def test_a_run_on_two_workers_is_one_trace_with_metrics() -> None:
    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    metering = MeterProvider(metric_readers=[reader])
    broker = InMemoryBroker()
    flow = _diamond()
    workers = []
    for name in ("w1", "w2"):
        bus = Telemetry(
            adapter="memory", worker_id=name, tracer_provider=tracing, meter_provider=metering
        )
        options = dataclasses.replace(RuntimeOptions.from_flows(flow), event_bus=bus)
        worker = InMemoryAdapter(runtime_options=options, broker=broker)
        bus.instrument(worker)
        workers.append(worker)
    run_id = await workers[0].start_run("diamond")
    turn = 0
    while not broker.queue.empty():
        delivery = broker.queue.get_nowait()
        worker = workers[turn % 2]
        turn += 1
        await worker.deliver(worker.handle_job, delivery)
    result = await workers[0].get_final_result(run_id)
    assert result is not None
    assert result.status == "completed"

    spans = exporter.get_finished_spans()
    by_node = {s.attributes["flowcraft.node"]: s for s in spans}  # type: ignore[index]
    assert set(by_node) == {"s", "a", "b", "j"}
    root = run_trace_context(run_id)
    from opentelemetry import trace

    root_context = trace.get_current_span(root).get_span_context()
    assert {s.context.trace_id for s in spans} == {root_context.trace_id}
    assert {s.parent.span_id for s in spans if s.parent} == {root_context.span_id}
    assert {s.attributes["flowcraft.worker"] for s in spans} == {"w1", "w2"}  # type: ignore[index]
    assert all(s.attributes["flowcraft.run"] == run_id for s in spans)  # type: ignore[index]
    assert [e.name for e in by_node["a"].events] == ["retry"]
    assert all(s.status.status_code is not StatusCode.ERROR for s in spans)

    sums = _sums(reader)
    processed = sum(
        v
        for (name, attrs), v in sums.items()
        if name == "flowcraft.jobs" and ("outcome", "processed") in attrs
    )
    assert processed == 4
    assert sum(v for (name, _), v in sums.items() if name == "flowcraft.node.retries") == 1
    finished = [
        (attrs, v) for (name, attrs), v in sums.items() if name == "flowcraft.runs.finished"
    ]
    assert sum(v for attrs, v in finished if ("status", "completed") in attrs) == 1
    assert sum(v for (name, _), v in sums.items() if name == "flowcraft.job.duration") == 4


async def test_a_run_started_in_a_span_joins_the_callers_trace() -> None:
    """The caller's span is kept in the run's state at start_run: every node span of
    the run, on either worker, is its child; the payload stays the seed's."""
    exporter = InMemorySpanExporter()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    broker = InMemoryBroker()
    flow = _diamond()
    workers = []
    for name in ("w1", "w2"):
        bus = Telemetry(adapter="memory", worker_id=name, tracer_provider=tracing)
        options = dataclasses.replace(RuntimeOptions.from_flows(flow), event_bus=bus)
        worker = InMemoryAdapter(runtime_options=options, broker=broker)
        bus.instrument(worker)
        workers.append(worker)
    caller = tracing.get_tracer("the caller")
    with caller.start_as_current_span("handle request") as root:
        run_id = await workers[0].start_run("diamond")
    origin = await workers[0].create_context(run_id).get("_flowcraft.origin")
    assert isinstance(origin, dict)
    assert "traceparent" in origin
    turn = 0
    while not broker.queue.empty():
        delivery = broker.queue.get_nowait()
        assert set(json.loads(delivery.job.encode())) <= set(_SEED_FIELDS)
        worker = workers[turn % 2]
        turn += 1
        await worker.deliver(worker.handle_job, delivery)
    nodes = [s for s in exporter.get_finished_spans() if s.name.startswith("flowcraft.node")]
    assert sorted(s.attributes["flowcraft.node"] for s in nodes) == ["a", "b", "j", "s"]  # type: ignore[index]
    assert {s.context.trace_id for s in nodes} == {root.get_span_context().trace_id}
    assert {s.parent.span_id for s in nodes if s.parent} == {root.get_span_context().span_id}
    assert {s.attributes["flowcraft.worker"] for s in nodes} == {"w1", "w2"}  # type: ignore[index]
    # outside a span nothing is kept (the run's trace is then derived from its id)
    other = await workers[0].start_run("diamond")
    assert await workers[0].create_context(other).get("_flowcraft.origin") is None


async def test_hand_backs_and_dead_letters_are_counted() -> None:
    reader = InMemoryMetricReader()
    metering = MeterProvider(metric_readers=[reader])
    bus = Telemetry(adapter="memory", worker_id="w", meter_provider=metering)
    old = Flow("diamond", version="1").node("s", _step)
    new = Flow("diamond", version="2").node("s", _step)
    broker = InMemoryBroker()
    starter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(new), broker=broker)
    worker = InMemoryAdapter(
        runtime_options=dataclasses.replace(RuntimeOptions.from_flows(old), event_bus=bus),
        broker=broker,
    )
    bus.instrument(worker)
    await starter.start_run("diamond")
    settlement = await worker.settle(broker.queue.get_nowait().job)
    assert settlement.action == "release"  # a version this worker lacks: handed back
    unknown = {"runId": "r", "blueprintId": "nope", "nodeId": "s"}
    assert (await worker.settle(unknown)).action == "dead-letter"
    sums = _sums(reader)
    counted = {name: v for (name, _), v in sums.items()}
    assert counted["flowcraft.jobs.handed_back"] == 1
    assert counted["flowcraft.jobs.dead_lettered"] == 1
    data = reader.get_metrics_data()
    assert data is not None
    reasons = {
        point.attributes.get("reason")
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "flowcraft.jobs.handed_back"
        for point in metric.data.data_points
        if point.attributes
    }
    assert reasons == {"version"}
