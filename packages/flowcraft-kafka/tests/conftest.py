"""Real Kafka, Cassandra and Redis (started by the flowcraft_backends plugin).

Cassandra is heavy on a small machine: one node per test session, one keyspace per
test run (created here, dropped at the end), and a fresh namespace (the ``ns``
partition component) per test. Kafka topics and Redis key prefixes are per test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from flowcraft_backends import RunningService
from flowcraft_backends._service import run_async
from flowcraft_kafka import CassandraClient, CassandraRunStore, CassandraSettings, create_schema


def cassandra_settings(
    service: RunningService, keyspace: str, **options: object
) -> CassandraSettings:
    return CassandraSettings.from_address(
        service.url,
        keyspace=keyspace,
        local_datacenter=service.extra.get("local_datacenter", "datacenter1"),
        request_timeout=30.0,
        consistency="ONE",
        serial_consistency="SERIAL",
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def keyspace() -> str:
    return f"fc_test_{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def cassandra_client(cassandra_service: RunningService, keyspace: str) -> Iterator[CassandraClient]:
    """One connection for the session; the test run's keyspace is created and dropped."""
    settings = cassandra_settings(cassandra_service, keyspace)

    async def connect() -> CassandraClient:
        client = await CassandraClient.connect(settings)
        await create_schema(client)
        return client

    client = run_async(connect)
    try:
        yield client
    finally:
        try:
            client.session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        finally:
            client.cluster.shutdown()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def run_store(
    cassandra_client: CassandraClient, namespace: str
) -> AsyncIterator[CassandraRunStore]:
    return CassandraRunStore(cassandra_client, namespace, ttl_seconds=3600)
