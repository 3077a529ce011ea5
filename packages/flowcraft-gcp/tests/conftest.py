"""Google's own Pub/Sub and Firestore emulators and a Redis (started by the
flowcraft_backends plugin). Each test gets a fresh namespace: its own Google Cloud
project (both emulators accept any project id, so nothing is shared between tests)
and its own Redis key prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_gcp import GcpAdapter, GcpClients


@dataclass(frozen=True)
class Backends:
    pubsub_host: str
    firestore_host: str
    redis_url: str


@pytest.fixture(scope="session")
def backends(
    pubsub_service: RunningService,
    firestore_service: RunningService,
    redis_service: RunningService,
) -> Iterator[Backends]:
    """The three servers; Google's clients find the emulators through these variables."""
    found = Backends(pubsub_service.url, firestore_service.url, redis_service.url)
    saved = {
        name: os.environ.get(name) for name in ("PUBSUB_EMULATOR_HOST", "FIRESTORE_EMULATOR_HOST")
    }
    os.environ["PUBSUB_EMULATOR_HOST"] = found.pubsub_host
    os.environ["FIRESTORE_EMULATOR_HOST"] = found.firestore_host
    yield found
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def project() -> str:
    return f"fc-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def clients(backends: Backends, project: str) -> AsyncIterator[GcpClients]:
    made = GcpClients(project)
    yield made
    await made.aclose()


@pytest.fixture
async def key_prefix(backends: Backends) -> AsyncIterator[str]:
    """A Redis key prefix of the test's own; its keys are removed after the test."""
    prefix = f"fc-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis_asyncio.Redis.from_url(backends.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class Namespace:
    """One test's corner of the three servers: a project and a Redis key prefix."""

    project: str
    redis_url: str
    key_prefix: str
    adapters: list[GcpAdapter] = field(default_factory=list)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Adapter options in this namespace (fast timings for tests)."""
        options: dict[str, Any] = {
            "project": self.project,
            "redis_url": self.redis_url,
            "key_prefix": self.key_prefix,
            "lease_seconds": 3.0,
            "retry_delay_seconds": 0.2,
            "ack_deadline_seconds": 10,
            "pull_timeout_seconds": 1.0,
        }
        options.update(overrides)
        return options

    def adapter(self, runtime_options: RuntimeOptions, **overrides: Any) -> GcpAdapter:
        adapter = GcpAdapter(runtime_options=runtime_options, **self.options(**overrides))
        self.adapters.append(adapter)
        return adapter


@pytest.fixture
async def namespace(backends: Backends, project: str, key_prefix: str) -> AsyncIterator[Namespace]:
    ns = Namespace(project, backends.redis_url, key_prefix)
    yield ns
    for adapter in ns.adapters:
        await adapter.aclose()
