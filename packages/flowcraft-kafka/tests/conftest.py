"""Real Kafka, Cassandra and Redis (started by the flowcraft_backends plugin).

Cassandra is heavy on a small machine: one node per test session, one keyspace per
test run (created here, dropped at the end), and a fresh namespace (the ``ns``
partition component) per test. Kafka topics and Redis key prefixes are per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_backends._service import run_async
from flowcraft_kafka import (
    CassandraClient,
    CassandraRunStore,
    CassandraSettings,
    KafkaAdapter,
    KafkaSettings,
    create_schema,
    create_topics,
)


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


@dataclass
class Namespace:
    """One test's corner of the servers: its topics, consumer group, Cassandra
    namespace and Redis key prefix."""

    kafka: KafkaSettings
    cassandra_client: CassandraClient
    redis_url: str
    namespace: str
    key_prefix: str
    adapters: list[KafkaAdapter] = field(default_factory=list)

    def adapter(self, runtime_options: RuntimeOptions, **overrides: Any) -> KafkaAdapter:
        options: dict[str, Any] = {
            "kafka": self.kafka,
            "cassandra_client": self.cassandra_client,
            "redis_url": self.redis_url,
            "namespace": self.namespace,
            "key_prefix": self.key_prefix,
            "lease_seconds": 3.0,
            "retry_delay_seconds": 0.2,
            "poll_seconds": 0.2,
        }
        options.update(overrides)
        adapter = KafkaAdapter(runtime_options=runtime_options, **options)
        self.adapters.append(adapter)
        return adapter


@pytest.fixture
async def kafka_namespace(
    kafka_service: RunningService,
    cassandra_client: CassandraClient,
    redis_service: RunningService,
    namespace: str,
) -> AsyncIterator[Namespace]:
    tag = uuid.uuid4().hex[:10]
    settings = KafkaSettings(
        bootstrap_servers=kafka_service.url,
        topic=f"fc-test-{tag}",
        group_id=f"fc-test-{tag}",
    )
    config = {"bootstrap.servers": kafka_service.url}
    await create_topics(config, [settings.topic, settings.dead_letters], partitions=4)
    ns = Namespace(settings, cassandra_client, redis_service.url, namespace, f"fc-test:{tag}:")
    yield ns
    for adapter in ns.adapters:
        await adapter.aclose()
    await delete_topics(config, [settings.topic, settings.dead_letters])
    client = redis_asyncio.Redis.from_url(redis_service.url)
    try:
        keys = [k async for k in client.scan_iter(match=ns.key_prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def delete_topics(config: dict[str, Any], topics: list[str]) -> None:
    """The admin client must outlive its futures: a client collected while a request
    is out purges the answers, and the futures never resolve (a teardown once hung
    for 300 s on that)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(config)
    futures = admin.delete_topics(topics, request_timeout=30)
    async with asyncio.timeout(40):
        for future in futures.values():
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(future)
    del admin
