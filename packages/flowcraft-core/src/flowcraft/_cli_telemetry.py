"""The OpenTelemetry SDK as the CLI sets it up for ``--trace-file`` and ``--metrics-port``.

``flowcraft.telemetry`` needs only the API: an application (or
``opentelemetry-instrument``) configures the SDK. These options are for a fleet that
has nothing of the kind yet: spans as JSON lines in a file (or on stderr), metrics on
a Prometheus endpoint through OpenTelemetry's Prometheus exporter, which serves the
same instruments with prometheus-client (the ``[prometheus]`` extra). The providers
are passed to :class:`~flowcraft.telemetry.Telemetry` rather than installed globally,
so an application's own SDK set-up in the ``--flows`` module is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import IO, Any

logger = logging.getLogger("flowcraft.worker")

_NEEDS = "pip install 'flowcraft-core[prometheus]'"


@dataclasses.dataclass
class Sdk:
    """The providers the CLI made (None: use the global ones) and how to flush them."""

    tracer_provider: Any = None
    meter_provider: Any = None
    _out: IO[str] | None = None

    def shutdown(self) -> None:
        """Flush the spans still batched and stop the metrics server's reader."""
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception as exc:  # exiting anyway; say why spans may be missing
                    logger.warning("shutting down OpenTelemetry failed: %r", exc)
        if self._out is not None and self._out is not sys.stderr:
            self._out.close()


def configure(
    trace_file: str | None, metrics_port: int | None, metrics_host: str, service: str
) -> Sdk:
    """Providers for ``--trace-file PATH`` (``-``: stderr) and ``--metrics-port``;
    raises ImportError naming the extra when the SDK is missing."""
    sdk = Sdk()
    if trace_file is None and metrics_port is None:
        return sdk
    try:
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise ImportError(f"--trace-file and --metrics-port need the SDK: {_NEEDS}") from exc
    resource = Resource.create({"service.name": service})
    if trace_file is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        out = sys.stderr if trace_file == "-" else open(trace_file, "a", encoding="utf-8")  # noqa: SIM115 (closed by shutdown)
        sdk._out = out
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(
            BatchSpanProcessor(
                ConsoleSpanExporter(
                    out=out, formatter=lambda span: span.to_json(indent=None) + "\n"
                )
            )
        )
        sdk.tracer_provider = provider
    if metrics_port is not None:
        try:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import start_http_server
        except ImportError as exc:
            raise ImportError(f"--metrics-port needs the Prometheus exporter: {_NEEDS}") from exc
        from opentelemetry.sdk.metrics import MeterProvider

        start_http_server(metrics_port, addr=metrics_host)
        sdk.meter_provider = MeterProvider(
            resource=resource, metric_readers=[PrometheusMetricReader()]
        )
    return sdk
