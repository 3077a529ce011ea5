"""The core's context-store kit (CONTRACTS.md section 1) on the real Cassandra."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from flowcraft.context import AsyncContext
from flowcraft.testing import ContextStoreTests
from flowcraft_backends import RunningService
from flowcraft_backends._service import run_async
from flowcraft_kafka import CassandraClient, CassandraContext, CassandraRunStore

from .conftest import cassandra_settings


@pytest.fixture(scope="session")
def second_client(
    cassandra_service: RunningService, keyspace: str, cassandra_client: CassandraClient
) -> Iterator[CassandraClient]:
    """Another connection to the same keyspace: another worker's view of a run."""
    client = run_async(
        lambda: CassandraClient.connect(cassandra_settings(cassandra_service, keyspace))
    )
    try:
        yield client
    finally:
        client.cluster.shutdown()


class TestCassandraContext(ContextStoreTests):
    @pytest.fixture
    def context(
        self, cassandra_client: CassandraClient, second_client: CassandraClient
    ) -> CassandraContext:
        self._other = CassandraRunStore(second_client, "kit")
        return CassandraContext(CassandraRunStore(cassandra_client, "kit"), uuid.uuid4().hex)

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        assert isinstance(context, CassandraContext)
        return CassandraContext(self._other, context.run_id)
