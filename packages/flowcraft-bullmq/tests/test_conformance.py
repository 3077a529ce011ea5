"""flowcraft's adapter conformance kit against BullMQAdapter on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.testing import AdapterConformanceTests
from flowcraft_backends import RunningService
from flowcraft_bullmq import BullMQAdapter


class TestBullMQConformance(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    async def adapter_factory(self, redis_service: RunningService) -> AsyncIterator[Any]:
        prefix = f"fcconf-{uuid.uuid4().hex[:8]}:"
        made: list[BullMQAdapter] = []

        def build(options: RuntimeOptions, **settings: Any) -> BullMQAdapter:
            settings.setdefault("reconcile_interval_seconds", None)
            adapter = BullMQAdapter(
                runtime_options=options, connection=redis_service.url, key_prefix=prefix, **settings
            )
            made.append(adapter)
            return adapter

        yield build
        for adapter in made:
            await adapter.aclose()
        client = redis_asyncio.Redis.from_url(redis_service.url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()

    async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
        assert isinstance(adapter, BullMQAdapter)
        await adapter.enqueue_raw(raw.decode("utf-8", "surrogateescape"))

    async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
        assert isinstance(adapter, BullMQAdapter)
        return [d.error for d in await adapter.dead_letters()]
