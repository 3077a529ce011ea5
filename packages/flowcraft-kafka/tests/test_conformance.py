"""The adapter conformance kit on the real Kafka, Cassandra and Redis."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.testing import AdapterConformanceTests, AdapterFactory
from flowcraft_kafka import KafkaAdapter

from .conftest import Namespace


class TestKafkaAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, kafka_namespace: Namespace) -> AdapterFactory:
        def build(options: RuntimeOptions, **overrides: Any) -> KafkaAdapter:
            return kafka_namespace.adapter(options, **overrides)

        return build
