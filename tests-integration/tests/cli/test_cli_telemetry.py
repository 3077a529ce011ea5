"""``flowcraft worker --telemetry --processes 2`` on Redis (bullmq): an application
starts diamond runs inside its own spans (the SDK's in-memory exporter); the node jobs,
handled by two worker processes, are spans of that trace, children of the caller's
span, each with its run, node and worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flowcraft import Flow
from flowcraft.adapters import build_adapter
from flowcraft.runtime import RuntimeOptions
from flowcraft.telemetry import Telemetry
from flowcraft_backends import RunningService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    import asyncio
    import os

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    from flowcraft import Flow

    # the application configures the SDK; here every span goes to a file as JSON
    provider = TracerProvider()
    spans = open(os.environ["SPANS_FILE"], "a")
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=spans)))
    trace.set_tracer_provider(provider)

    async def step(ctx):
        await asyncio.sleep(0.2)  # long enough for both workers to take a branch
        return ctx.node_id

    flow = Flow("diamond").node("s", step).node("a", step).node("b", step).node("j", step)
    flow.edge("s", "a").edge("s", "b").edge("a", "j").edge("b", "j")
"""


def _spans(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    at = text.find("{")
    while at >= 0:
        span, end = decoder.raw_decode(text, at)
        found.append(span)
        at = text.find("{", end)
    return found


def test_a_diamond_on_two_worker_processes_is_one_trace(
    redis_service: RunningService, tmp_path: Path
) -> None:
    flows = tmp_path / "flows.py"
    flows.write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    spans = tmp_path / "spans.jsonl"
    ns = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "SPANS_FILE": str(spans),
        "FLOWCRAFT_ADAPTER": "bullmq",
        "FLOWCRAFT_BULLMQ_URL": redis_service.url,
        "FLOWCRAFT_BULLMQ_KEY_PREFIX": f"otel{ns}:",
        "FLOWCRAFT_BULLMQ_QUEUE_NAME": f"otel{ns}",
        "FLOWCRAFT_FLOWS": f"{flows}:flow",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        supervisor = subprocess.Popen(
            [FLOWCRAFT, "worker", "--telemetry", "--processes", "2", "-c", "1"],
            env=env,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("worker started") < 2:
            assert supervisor.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # the caller: its own SDK (in memory) and a span it starts the runs in
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        run_ids = asyncio.run(_start_three(env, provider))
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=60) == 0, log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()
    found = _spans(spans)
    callers = {
        s.attributes["run"]: s.get_span_context()  # type: ignore[index]
        for s in exporter.get_finished_spans()
    }
    workers_seen: set[str] = set()
    for run_id in run_ids:
        mine = [s for s in found if s["attributes"]["flowcraft.run"] == run_id]
        assert sorted(s["attributes"]["flowcraft.node"] for s in mine) == ["a", "b", "j", "s"]
        # one connected trace: every node span is a child of the caller's span
        assert {s["context"]["trace_id"] for s in mine} == {f"0x{callers[run_id].trace_id:032x}"}
        assert {s["parent_id"] for s in mine} == {f"0x{callers[run_id].span_id:016x}"}
        assert all(s["attributes"]["flowcraft.adapter"] == "bullmq" for s in mine)
        workers_seen |= {s["attributes"]["flowcraft.worker"] for s in mine}
    assert len({s["context"]["trace_id"] for s in found}) == len(run_ids)
    # with one job at a time per process and a 0.2 s node, both processes took jobs
    assert len(workers_seen) == 2


async def _start_three(env: dict[str, str], provider: TracerProvider) -> list[str]:
    """Start three diamond runs as an application would: each inside its own span,
    on an adapter instrumented with flowcraft.telemetry; wait for each."""
    flow = Flow("diamond").node("s", _nop).node("a", _nop).node("b", _nop).node("j", _nop)
    flow.edge("s", "a").edge("s", "b").edge("a", "j").edge("b", "j")
    adapter, _, _ = build_adapter(
        "bullmq",
        RuntimeOptions.from_flows(flow),
        {
            "url": env["FLOWCRAFT_BULLMQ_URL"],
            "key_prefix": env["FLOWCRAFT_BULLMQ_KEY_PREFIX"],
            "queue_name": env["FLOWCRAFT_BULLMQ_QUEUE_NAME"],
        },
    )
    Telemetry(adapter="bullmq", tracer_provider=provider).instrument(adapter)
    tracer = provider.get_tracer("the application")
    run_ids = []
    try:
        for n in range(3):
            with tracer.start_as_current_span(f"request {n}") as span:
                run_id = await adapter.start_run("diamond")
                span.set_attribute("run", run_id)
            result = await adapter.wait_for_result(run_id, timeout=60)
            assert result.status == "completed"
            run_ids.append(run_id)
    finally:
        await adapter.aclose()
    return run_ids


def _nop(ctx: object) -> None:
    return None
