"""Google's own Pub/Sub and Firestore emulators and a Redis (started by the
flowcraft_backends plugin). Each test gets a fresh namespace: its own Google Cloud
project (both emulators accept any project id, so nothing is shared between tests)
and its own Redis key prefix."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as redis_asyncio

from flowcraft_backends import RunningService
from flowcraft_gcp import GcpClients


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
