"""Fixtures: a namespaced BullMQ adapter fleet on the session's real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import Flow, RuntimeOptions
from flowcraft.distributed.adapter import FinalResult
from flowcraft_backends import RunningService
from flowcraft_bullmq import BullMQAdapter


async def drop_prefix(url: str, prefix: str) -> None:
    client = redis_asyncio.Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


def options_for(*flows: Flow) -> RuntimeOptions:
    registry: dict[str, Any] = {}
    blueprints = {}
    for flow in flows:
        registry.update(flow.registry())
        blueprint = flow.to_blueprint()
        blueprints[blueprint.id] = blueprint
    return RuntimeOptions(registry=registry, blueprints=blueprints)


class Fleet:
    """A client adapter and worker adapters (tasks running ``worker()``) on one prefix."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self.adapters: list[BullMQAdapter] = []
        self.tasks: list[tuple[BullMQAdapter, asyncio.Future[None]]] = []
        self._client: BullMQAdapter | None = None

    def adapter(self, options: RuntimeOptions, **settings: Any) -> BullMQAdapter:
        settings.setdefault("key_prefix", self.prefix)
        settings.setdefault("reconcile_interval_seconds", None)
        adapter = BullMQAdapter(runtime_options=options, connection=self.url, **settings)
        self.adapters.append(adapter)
        return adapter

    async def start(self, options: RuntimeOptions, workers: int = 2, **settings: Any) -> None:
        self._client = self.adapter(options, **settings)
        for _ in range(workers):
            worker = self.adapter(options, **settings)
            self.tasks.append((worker, asyncio.ensure_future(worker.worker())))
        await asyncio.sleep(0)

    @property
    def client(self) -> BullMQAdapter:
        assert self._client is not None, "call start() first"
        return self._client

    async def run(self, blueprint_id: str, initial: dict[str, Any] | None = None) -> FinalResult:
        run_id = await self.client.start_run(blueprint_id, initial)
        return await self.client.wait_for_result(run_id, 30)

    async def until(self, check: Callable[[], Any], what: str, seconds: float = 30) -> None:
        try:
            async with asyncio.timeout(seconds):
                while not await check():  # noqa: ASYNC110 (polling the backend)
                    await asyncio.sleep(0.02)
        except TimeoutError:
            pytest.fail(f"timed out waiting for {what}")

    async def stop_workers(self) -> None:
        for adapter, _ in self.tasks:
            await adapter.stop()
        async with asyncio.timeout(30):
            for _, task in self.tasks:
                await task
        self.tasks.clear()

    async def close(self) -> None:
        await self.stop_workers()
        for adapter in self.adapters:
            await adapter.aclose()


@pytest.fixture
def redis_url(redis_service: RunningService) -> str:
    return redis_service.url


@pytest.fixture
async def prefix(redis_url: str) -> AsyncIterator[str]:
    name = f"fctest-{uuid.uuid4().hex[:10]}:"
    yield name
    await drop_prefix(redis_url, name)


@pytest.fixture
async def fleet(redis_url: str, prefix: str) -> AsyncIterator[Fleet]:
    made = Fleet(redis_url, prefix)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()
