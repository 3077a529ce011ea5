"""The adapter conformance kit on the in-memory adapter (what an adapter package writes)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.testing import AdapterConformanceTests, AdapterFactory


async def _yield(operation: str, run_id: str) -> None:
    """Give other jobs a turn at every store operation, as a network round trip would."""
    await asyncio.sleep(0)


class TestInMemoryAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        broker = InMemoryBroker(fault=_yield)
        self._broker = broker

        def build(options: RuntimeOptions, **kw: Any) -> InMemoryAdapter:
            return InMemoryAdapter(runtime_options=options, broker=broker, **kw)

        return build

    async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
        self._broker.put_raw(raw)

    async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
        return [error for _job, error in self._broker.dead_letters]
