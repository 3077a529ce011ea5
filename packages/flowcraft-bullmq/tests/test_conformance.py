"""flowcraft's adapter conformance kit against BullMQAdapter on a real Redis."""

from __future__ import annotations

import pytest

from flowcraft.testing import AdapterConformanceTests

from .conftest import BullMQFactory


class TestBullMQConformance(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, bullmq_factory: BullMQFactory) -> BullMQFactory:
        return bullmq_factory
