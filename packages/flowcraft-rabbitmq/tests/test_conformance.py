"""The adapter conformance kit against real RabbitMQ, PostgreSQL and Redis."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.testing import AdapterConformanceTests, AdapterFactory
from flowcraft_rabbitmq import RabbitMQAdapter

from .conftest import Namespace


class TestRabbitMQAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, namespace: Namespace) -> AdapterFactory:
        def build(options: RuntimeOptions, **overrides: Any) -> RabbitMQAdapter:
            return namespace.adapter(options, **overrides)

        return build
