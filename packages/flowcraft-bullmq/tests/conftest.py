"""Fixtures: BullMQ adapters on the session's real Redis, each test on its own key prefix,
and fleets of them (the conformance kit's :class:`~flowcraft.testing.Fleet`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import Flow, RuntimeOptions
from flowcraft.testing import Fleet
from flowcraft_backends import RunningService
from flowcraft_bullmq import BullMQAdapter

BullMQFactory = Callable[..., BullMQAdapter]
StartFleet = Callable[..., Awaitable[Fleet]]


async def drop_prefix(url: str, prefix: str) -> None:
    client = redis_asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


@pytest.fixture
def redis_url(redis_service: RunningService) -> str:
    return redis_service.url


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    name = f"fctest-{uuid.uuid4().hex[:10]}:"
    yield name
    await drop_prefix(redis_url, name)


@pytest.fixture
async def bullmq_factory(redis_url: str, prefix: str) -> AsyncIterator[BullMQFactory]:
    """``(runtime_options, **settings) -> BullMQAdapter`` on the test's prefix (no
    reconciler unless asked); every adapter it made is closed at the end."""
    made: list[BullMQAdapter] = []

    def build(options: RuntimeOptions, **settings: Any) -> BullMQAdapter:
        settings.setdefault("key_prefix", prefix)
        settings.setdefault("reconcile_interval_seconds", None)
        adapter = BullMQAdapter(runtime_options=options, connection=redis_url, **settings)
        made.append(adapter)
        return adapter

    yield build
    for adapter in made:
        await adapter.aclose()


@pytest.fixture
async def start_fleet(bullmq_factory: BullMQFactory) -> AsyncIterator[StartFleet]:
    """``await start_fleet(*flows, workers=2, **settings)``: a started kit ``Fleet`` (a client
    adapter and worker adapters) running ``flows``; its workers are stopped at the end."""
    fleets: list[Fleet] = []

    async def start(*flows: Flow, workers: int = 2, **settings: Any) -> Fleet:
        fleet = Fleet(bullmq_factory, RuntimeOptions.from_flows(*flows), timeout=30)
        fleets.append(fleet)
        await fleet.start(workers, **settings)
        return fleet

    yield start
    for fleet in fleets:
        await fleet.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()
