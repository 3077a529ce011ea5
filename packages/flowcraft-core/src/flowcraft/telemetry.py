"""OpenTelemetry traces and metrics for a fleet, built from flowcraft's events.

:class:`Telemetry` is an event bus (put it in front of your own) that counts what a
worker's events say: jobs by outcome, jobs enqueued, retries, runs finished by
status. ``instrument(adapter)`` wraps every node job in a span (``flowcraft.node
<id>``; attributes run, node, blueprint, adapter, worker) and times it. It needs
only ``opentelemetry-api`` (the ``[otel]`` extra): whoever configures the SDK
(``opentelemetry-instrument``, or the application) decides where spans and metrics
go; without an SDK it costs almost nothing.

One trace per run across workers: a run's trace id and its root span id are derived
from the run id (SHA-256), so every worker puts its spans of a run into the same
trace without carrying anything in the job payload (which stays the seed's five
fields) or in the run's state.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from flowcraft.distributed import BaseDistributedAdapter, JobPayload
from flowcraft.events import EventBus, FlowEvent, emit

__all__ = ["Telemetry", "run_trace_context"]

_JOB_OUTCOMES = {
    "job:processed": "processed",
    "job:failed": "failed",
    "job:requeued": "requeued",
    "job:duplicate": "duplicate",
}


def run_trace_context(run_id: str) -> Any:
    """The OpenTelemetry context whose (remote) parent is the run's root span: the
    same on every worker, derived from the run id."""
    digest = hashlib.sha256(run_id.encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    parent = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


class Telemetry:
    """An event bus that records spans and metrics, then forwards to ``inner``."""

    def __init__(
        self,
        inner: EventBus | None = None,
        *,
        adapter: str = "",
        worker_id: str = "",
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.inner = inner
        self.attributes = {"flowcraft.adapter": adapter, "flowcraft.worker": worker_id}
        self.tracer = trace.get_tracer("flowcraft", tracer_provider=tracer_provider)
        meter = metrics.get_meter("flowcraft", meter_provider=meter_provider)
        self.jobs = meter.create_counter(
            "flowcraft.jobs", unit="{job}", description="Node jobs handled, by outcome."
        )
        self.enqueued = meter.create_counter(
            "flowcraft.jobs.enqueued", unit="{job}", description="Node jobs enqueued."
        )
        self.retries = meter.create_counter(
            "flowcraft.node.retries", unit="{retry}", description="Failed attempts retried."
        )
        self.runs = meter.create_counter(
            "flowcraft.runs.finished", unit="{run}", description="Runs ended, by status."
        )
        self.duration = meter.create_histogram(
            "flowcraft.job.duration", unit="s", description="Node job handling time."
        )

    async def emit(self, event: FlowEvent) -> None:
        self.record(event)
        await emit(self.inner, event)

    def record(self, event: FlowEvent) -> None:
        """Count one event (a job's events arrive inside its span: retries become the
        span's events)."""
        kind = event.type
        if kind in _JOB_OUTCOMES:
            self.jobs.add(1, {**self.attributes, "outcome": _JOB_OUTCOMES[kind]})
        elif kind == "job:enqueued":
            self.enqueued.add(1, self.attributes)
        elif kind == "node:retry":
            self.retries.add(1, {**self.attributes, "flowcraft.node": event.node_id or ""})
            attempt = event.data.get("attempt")
            trace.get_current_span().add_event(
                "retry", {"attempt": int(attempt) if isinstance(attempt, int) else 0}
            )
        elif kind == "workflow:finish":
            self.runs.add(1, {**self.attributes, "status": str(event.data.get("status", ""))})

    def instrument(self, adapter: BaseDistributedAdapter) -> None:
        """Wrap ``adapter``'s job handling in a span per job (in its run's trace) and
        time it. (Counting needs this object as the adapter's event bus too: build the
        adapter with ``RuntimeOptions(event_bus=Telemetry(inner=your_bus))``.)"""
        handle = adapter.handle_job

        async def handle_job(job: JobPayload) -> None:
            attributes = {
                **self.attributes,
                "flowcraft.run": job.run_id,
                "flowcraft.node": job.node_id,
                "flowcraft.blueprint": job.blueprint_id,
            }
            began = time.perf_counter()
            with self.tracer.start_as_current_span(
                f"flowcraft.node {job.node_id}",
                context=run_trace_context(job.run_id),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    await handle(job)
                except BaseException as exc:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    raise
                finally:
                    self.duration.record(
                        time.perf_counter() - began,
                        {**self.attributes, "flowcraft.node": job.node_id},
                    )

        adapter.handle_job = handle_job  # type: ignore[method-assign]
