"""A fresh Azure namespace per test: queue pair, Cosmos DB container, Redis prefix."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from azure.cosmos.aio import CosmosClient
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService

from .azure_fleet import Settings


@pytest.fixture
async def settings(
    azurite_service: RunningService,
    cosmos_service: RunningService,
    redis_service: RunningService,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    made = Settings(
        storage_connection_string=azurite_service.extra["connection_string"],
        cosmos_url=cosmos_service.url,
        cosmos_key=cosmos_service.extra["key"],
        redis_url=redis_service.url,
        queue_name=f"fc-crash-{tag}",
        database="flowcraft-it",
        container=f"runs-{tag}",
        key_prefix=f"fc-crash:{tag}:",
        effects_path=str(tmp_path / "effects.jsonl"),
    )
    setup = made.adapter(RuntimeOptions())
    try:
        await setup.create_resources()
    finally:
        await setup.aclose()
    yield made
    cleanup = made.adapter(RuntimeOptions())
    try:
        await cleanup.queue.delete()
    finally:
        await cleanup.aclose()
    async with CosmosClient(
        made.cosmos_url, credential=made.cosmos_key, enable_endpoint_discovery=False
    ) as client:
        with contextlib.suppress(CosmosResourceNotFoundError):
            await client.get_database_client(made.database).delete_container(made.container)
    redis = redis_asyncio.Redis.from_url(made.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=made.key_prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()
