"""flowcraft's adapter conformance kit against BullMQAdapter on a real Redis."""

from __future__ import annotations

import pytest

from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.testing import AdapterConformanceTests
from flowcraft_bullmq import BullMQAdapter

from .conftest import BullMQFactory


class TestBullMQConformance(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, bullmq_factory: BullMQFactory) -> BullMQFactory:
        return bullmq_factory

    async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
        assert isinstance(adapter, BullMQAdapter)
        await adapter.enqueue_raw(raw.decode("utf-8", "surrogateescape"))

    async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
        assert isinstance(adapter, BullMQAdapter)
        return [d.error for d in await adapter.dead_letters()]
