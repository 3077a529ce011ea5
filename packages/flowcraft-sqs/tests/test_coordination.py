"""DynamoDbCoordinationStore: the core's store conformance kit against moto, plus what
DynamoDB makes special (expiry without deletion, key lengths, one call per operation)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from flowcraft.distributed import CoordinationStore
from flowcraft.testing import CoordinationStoreTests
from flowcraft_sqs import AwsClients, DynamoDbCoordinationStore

# Expiry is checked against the wall clock to the millisecond; moto never deletes.
_TTL = 0.6
_RESOLUTION = 0.15


def _store(clients: AwsClients, table: str) -> DynamoDbCoordinationStore:
    return DynamoDbCoordinationStore(table, clients=clients, namespace=f"t-{uuid.uuid4().hex}")


class TestDynamoDbCoordinationStore(CoordinationStoreTests):
    short_ttl_seconds = _TTL
    ttl_resolution_seconds = _RESOLUTION

    @pytest.fixture
    async def store(self, clients: AwsClients, table: str) -> AsyncIterator[CoordinationStore]:
        async with _store(clients, table) as store:
            yield store

    @pytest.fixture
    async def other_store(
        self, clients: AwsClients, table: str
    ) -> AsyncIterator[CoordinationStore]:
        async with _store(clients, table) as store:
            yield store
