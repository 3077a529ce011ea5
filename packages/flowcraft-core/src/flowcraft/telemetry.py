"""OpenTelemetry traces and metrics for a fleet, built from flowcraft's events.

:class:`Telemetry` is an event bus (put it in front of your own) that counts what a
worker's events say: jobs by outcome, jobs enqueued, retries, runs finished by
status. ``instrument(adapter)`` makes it the adapter's ``instrumentation``: every
node job runs in a span (``flowcraft.node <id>``; attributes run, node, blueprint,
adapter, worker), timed, its hand-back or dead-lettering counted; ``start_run`` keeps
the caller's trace context in the run's state; and the adapter's ``queue_depth()`` is
reported as a gauge. It needs only ``opentelemetry-api`` (the ``[otel]`` extra):
whoever configures the SDK (``opentelemetry-instrument``, the application, or
``flowcraft worker --metrics-port/--trace-file``) decides where spans and metrics go;
without an SDK it costs almost nothing.

One trace per run across workers: when the run was started inside a span (the
caller's), its trace context is kept in the run's state (``_flowcraft.origin``, W3C
``traceparent``) and every worker's spans of the run are children of that span.
Otherwise the run's trace id and root span id are derived from the run id (SHA-256),
so the workers still agree on one trace. The job payload stays the seed's five
fields either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

from opentelemetry import metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from flowcraft.distributed import BaseDistributedAdapter, JobPayload
from flowcraft.distributed import keys as K
from flowcraft.distributed.delivery import settlement_for
from flowcraft.errors import VersionMismatchError
from flowcraft.events import EventBus, FlowEvent, emit

__all__ = ["Telemetry", "run_trace_context"]

logger = logging.getLogger("flowcraft.telemetry")

_JOB_OUTCOMES = {
    "job:processed": "processed",
    "job:failed": "failed",
    "job:requeued": "requeued",
    "job:duplicate": "duplicate",
}

_BASE_QUEUE_DEPTH = BaseDistributedAdapter.queue_depth

_ORIGINS_KEPT = 4096
"""Runs whose trace context a worker remembers (one state read per run, not per job)."""


def run_trace_context(run_id: str) -> Context:
    """The OpenTelemetry context whose (remote) parent is the run's root span: the
    same on every worker, derived from the run id (for runs started outside a span)."""
    digest = hashlib.sha256(run_id.encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    parent = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _hand_back_reason(exc: BaseException) -> str | None:
    """Why a job went back to the queue (None: it was dead-lettered)."""
    settlement = settlement_for(exc)
    if settlement.action == "dead-letter":
        return None
    if settlement.failed_attempt:
        return "retry"
    if settlement.busy:
        return "busy"
    return "version" if isinstance(exc, VersionMismatchError) else "error"


class Telemetry:
    """An event bus that records spans and metrics, then forwards to ``inner``; and,
    through ``instrument(adapter)``, the adapter's :class:`Instrumentation`."""

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
        self._adapter: BaseDistributedAdapter | None = None
        self._origins: OrderedDict[str, Context] = OrderedDict()
        self._depth: int | None = None
        meter = metrics.get_meter("flowcraft", meter_provider=meter_provider)
        self.jobs = meter.create_counter(
            "flowcraft.jobs", unit="{job}", description="Node jobs handled, by outcome."
        )
        self.enqueued = meter.create_counter(
            "flowcraft.jobs.enqueued", unit="{job}", description="Node jobs enqueued."
        )
        self.handed_back = meter.create_counter(
            "flowcraft.jobs.handed_back",
            unit="{job}",
            description="Jobs returned to the queue, by reason (retry, busy, version, error).",
        )
        self.dead_lettered = meter.create_counter(
            "flowcraft.jobs.dead_lettered",
            unit="{job}",
            description="Jobs this worker dead-lettered, by error type.",
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
        meter.create_observable_gauge(
            "flowcraft.queue.depth",
            callbacks=[self._observe_depth],
            unit="{job}",
            description="Jobs waiting in the adapter's queue (where the queue can tell).",
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
        """Become ``adapter``'s instrumentation: a span per job, the caller's trace kept
        at ``start_run``. (Counting events needs this object as the adapter's event bus
        too: build it with ``RuntimeOptions(event_bus=Telemetry(inner=your_bus))``.)"""
        self._adapter = adapter
        adapter.instrumentation = self

    # ------------------------------------------------------------ Instrumentation

    def run_origin(self) -> dict[str, str] | None:
        """The current trace context (W3C ``traceparent``/``tracestate``), if the
        caller is inside a span."""
        if not trace.get_current_span().get_span_context().is_valid:
            return None
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier or None

    @contextlib.asynccontextmanager
    async def job_scope(self, job: JobPayload) -> AsyncIterator[None]:
        """The job's span (a child of the run's origin), its duration, and what became
        of it when it raised: handed back (by reason) or dead-lettered."""
        attributes = {
            **self.attributes,
            "flowcraft.run": job.run_id,
            "flowcraft.node": job.node_id,
            "flowcraft.blueprint": job.blueprint_id,
        }
        parent = await self._parent(job.run_id)
        began = time.perf_counter()
        with self.tracer.start_as_current_span(
            f"flowcraft.node {job.node_id}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield
            except Exception as exc:
                reason = _hand_back_reason(exc)
                if reason is None:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    self.dead_lettered.add(1, {**self.attributes, "error": type(exc).__name__})
                else:
                    if reason in ("retry", "error"):
                        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    span.set_attribute("flowcraft.handed_back", reason)
                    self.handed_back.add(1, {**self.attributes, "reason": reason})
                raise
            except BaseException as exc:
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                self.duration.record(
                    time.perf_counter() - began,
                    {**self.attributes, "flowcraft.node": job.node_id},
                )

    async def _parent(self, run_id: str) -> Context:
        """The run's origin (read once per run from its state), else its derived trace."""
        found = self._origins.get(run_id)
        if found is not None:
            return found
        carrier = None
        if self._adapter is not None:
            try:
                carrier = await self._adapter.create_context(run_id).get(K.ORIGIN)
            except Exception as exc:  # a span without its parent beats a failed job
                logger.debug("reading run %s's trace context failed: %r", run_id, exc)
                return run_trace_context(run_id)
        parent = run_trace_context(run_id)
        if isinstance(carrier, dict):
            extracted = propagate.extract({str(k): str(v) for k, v in carrier.items()})
            if trace.get_current_span(extracted).get_span_context().is_valid:
                parent = extracted
        self._origins[run_id] = parent
        if len(self._origins) > _ORIGINS_KEPT:
            self._origins.popitem(last=False)
        return parent

    def start_span(self, blueprint_id: str) -> contextlib.AbstractContextManager[object]:
        """A span to call ``start_run`` in (``flowcraft start``): the run's trace root
        when the caller has no span of its own."""
        return self.tracer.start_as_current_span(
            f"flowcraft.start {blueprint_id}",
            kind=SpanKind.PRODUCER,
            attributes={**self.attributes, "flowcraft.blueprint": blueprint_id},
        )

    # ------------------------------------------------------------ queue depth

    async def watch_queue_depth(self, interval: float = 5.0) -> None:
        """Ask the instrumented adapter's ``queue_depth()`` every ``interval`` seconds
        for the gauge ``flowcraft.queue.depth`` (until cancelled; returns at once if
        the queue cannot tell)."""
        adapter = self._adapter
        if adapter is None:
            return
        while True:
            try:
                self._depth = await adapter.queue_depth()
            except Exception as exc:
                logger.debug("queue_depth() failed: %r", exc)
                self._depth = None
            if self._depth is None and type(adapter).queue_depth is _BASE_QUEUE_DEPTH:
                return  # the queue cannot tell
            await asyncio.sleep(interval)

    def _observe_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        if self._depth is None:
            return []
        return [Observation(self._depth, self.attributes)]
