"""Fixtures: Miniflare (started by flowcraft_backends) running the companion Worker
shipped in this package, one Worker client per test, fresh names per test."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

import pytest

from flowcraft_backends import RunningService
from flowcraft_cloudflare import Inbox, WorkerClient, WorkerSettings, worker_dir


def worker_secret() -> str:
    """The loopback-only secret the launcher gives the Worker (its miniflare.json)."""
    config = json.loads((worker_dir() / "miniflare.json").read_text())
    secret: str = config["bindings"]["FLOWCRAFT_SECRET"]
    return secret


def settings_for(service: RunningService) -> WorkerSettings:
    return WorkerSettings(url=service.url, secret=worker_secret())


@pytest.fixture
def settings(miniflare_service: RunningService) -> WorkerSettings:
    return settings_for(miniflare_service)


@pytest.fixture
async def client(settings: WorkerSettings) -> AsyncIterator[WorkerClient]:
    made = WorkerClient(settings)
    yield made
    await made.aclose()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def inbox(client: WorkerClient, namespace: str) -> Inbox:
    return Inbox(client, f"{namespace}-jobs")
