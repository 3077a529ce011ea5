"""Fixtures: the moto server (started by flowcraft_backends), reset before each test,
with the adapter's table and queues created fresh."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import AsyncIterator

import pytest

from flowcraft_backends import RunningService
from flowcraft_sqs import AwsClients, AwsSettings, QueueUrls, create_queues, create_table

TABLE = "flowcraft-test"


def settings_for(service: RunningService) -> AwsSettings:
    return AwsSettings(
        endpoint_url=service.url,
        region_name=service.extra["region"],
        aws_access_key_id=service.extra["aws_access_key_id"],
        aws_secret_access_key=service.extra["aws_secret_access_key"],
    )


def reset(service: RunningService) -> None:
    """Forget every queue and table (moto slows down as queues grow)."""
    request = urllib.request.Request(service.extra["reset_url"], data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


@pytest.fixture
def moto(moto_service: RunningService) -> RunningService:
    reset(moto_service)
    return moto_service


@pytest.fixture
def aws(moto: RunningService) -> AwsSettings:
    return settings_for(moto)


@pytest.fixture
async def clients(aws: AwsSettings) -> AsyncIterator[AwsClients]:
    made = AwsClients(aws)
    yield made
    made.close()


@pytest.fixture
async def table(clients: AwsClients) -> str:
    await create_table(clients, TABLE)
    return TABLE


@pytest.fixture
async def queues(clients: AwsClients) -> QueueUrls:
    return await create_queues(clients, f"jobs-{uuid.uuid4().hex[:8]}", visibility_timeout=10)


@pytest.fixture
async def fifo_queues(clients: AwsClients) -> QueueUrls:
    return await create_queues(
        clients, f"jobs-{uuid.uuid4().hex[:8]}", fifo=True, visibility_timeout=10
    )
