"""The conformance kit against Google's Pub/Sub and Firestore emulators and Redis."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.testing import AdapterConformanceTests, AdapterFactory
from flowcraft_gcp import GcpAdapter

from .conftest import Namespace


class TestGcpAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True
    # A pull ended by its client deadline (1 s here) just as Pub/Sub handed it a message
    # strands that message until its ack deadline (10 s here) passes: a run of the kit
    # once took over 30 s on a quiet machine, and test_failure_fails_run_once (five jobs
    # one after another) once passed 60 s in a loaded CI run. The kit checks outcomes,
    # not latency.
    timeout_seconds = 120.0

    @pytest.fixture
    def adapter_factory(self, namespace: Namespace) -> AdapterFactory:
        def build(options: RuntimeOptions, **overrides: Any) -> GcpAdapter:
            return namespace.adapter(options, **overrides)

        return build

    @pytest.mark.xfail(
        reason="Firestore holds at most 1 MiB per document and the adapter keeps a run in "
        "one document: the kit's 1 MB value is refused with StateLimitError (see "
        "test_context.py)",
        strict=True,
    )
    async def test_large_state_costs_deltas_only(self, adapter_factory: AdapterFactory) -> None:
        await super().test_large_state_costs_deltas_only(adapter_factory)
