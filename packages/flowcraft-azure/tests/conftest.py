"""Real Azurite (queues), the Cosmos DB test server and Redis, started by the
flowcraft_backends plugin, and a fresh namespace per test: its own queue pair,
Cosmos container and Redis key prefix, all removed after the test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from azure.cosmos import PartitionKey
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.cosmos.exceptions import CosmosResourceNotFoundError

from flowcraft import RuntimeOptions
from flowcraft_azure import AzureAdapter, CosmosRunStore
from flowcraft_backends import RunningService

DATABASE = "flowcraft-test"


@dataclass
class Backends:
    storage_connection_string: str
    cosmos_url: str
    cosmos_key: str
    redis_url: str

    def cosmos_client(self) -> CosmosClient:
        # The test server advertises no regions: endpoint discovery must be off.
        return CosmosClient(
            self.cosmos_url, credential=self.cosmos_key, enable_endpoint_discovery=False
        )


@dataclass
class Namespace:
    """One test's corner of the three servers."""

    backends: Backends
    queue_name: str
    container: str
    key_prefix: str
    adapters: list[AzureAdapter] = field(default_factory=list)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Constructor options of an adapter in this namespace (fast timings for tests)."""
        options: dict[str, Any] = {
            "storage_connection_string": self.backends.storage_connection_string,
            "cosmos_url": self.backends.cosmos_url,
            "cosmos_credential": self.backends.cosmos_key,
            "cosmos_options": {"enable_endpoint_discovery": False},
            # The test server keeps one copy in one process: every read sees every
            # write, whatever consistency it reports (it reports Session).
            "require_strong_consistency": False,
            "redis_url": self.backends.redis_url,
            "queue_name": self.queue_name,
            "database": DATABASE,
            "container": self.container,
            "key_prefix": self.key_prefix,
            "lease_seconds": 3.0,
            "retry_delay_seconds": 0.2,
            "visibility_seconds": 10.0,
            "max_poll_interval": 0.2,
            # No per-request look-up of proxy settings in the environment (the README's
            # quick-start test runs with the default).
            "trust_env": False,
        }
        options.update(overrides)
        return options

    def adapter(self, runtime_options: RuntimeOptions, **overrides: Any) -> AzureAdapter:
        adapter = AzureAdapter(runtime_options=runtime_options, **self.options(**overrides))
        self.adapters.append(adapter)
        return adapter


@pytest.fixture(scope="session")
def backends(
    azurite_service: RunningService, cosmos_service: RunningService, redis_service: RunningService
) -> Backends:
    return Backends(
        azurite_service.extra["connection_string"],
        cosmos_service.url,
        cosmos_service.extra["key"],
        redis_service.url,
    )


async def _drop(ns: Namespace) -> None:
    async with ns.backends.cosmos_client() as client:
        with contextlib.suppress(CosmosResourceNotFoundError):
            await client.get_database_client(DATABASE).delete_container(ns.container)
    redis = redis_asyncio.Redis.from_url(ns.backends.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=ns.key_prefix + "*", count=500)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


@pytest.fixture
async def namespace(backends: Backends) -> AsyncIterator[Namespace]:
    tag = uuid.uuid4().hex[:12]
    ns = Namespace(backends, f"fc-test-{tag}", f"runs-{tag}", f"fc-test:{tag}:")
    setup = AzureAdapter(runtime_options=RuntimeOptions(), **ns.options())
    try:
        await setup.create_resources()
    finally:
        await setup.aclose()
    yield ns
    for adapter in ns.adapters:
        await adapter.aclose()
    cleanup = AzureAdapter(runtime_options=RuntimeOptions(), **ns.options())
    try:
        await cleanup.queue.delete()
    finally:
        await cleanup.aclose()
    await _drop(ns)


@pytest.fixture
def make_adapter(namespace: Namespace) -> Callable[..., AzureAdapter]:
    """``make_adapter(runtime_options, **overrides)``: an adapter in the test's namespace."""
    return namespace.adapter


@pytest.fixture
async def container(backends: Backends) -> AsyncIterator[ContainerProxy]:
    """A fresh container for context-store tests."""
    name = f"ctx-{uuid.uuid4().hex[:12]}"
    async with backends.cosmos_client() as client:
        db = await client.create_database_if_not_exists(DATABASE)
        made = await db.create_container_if_not_exists(name, partition_key=PartitionKey("/run"))
        yield made
        await db.delete_container(name)


@pytest.fixture
def store(container: ContainerProxy) -> CosmosRunStore:
    return CosmosRunStore(container)
