"""Real RabbitMQ, PostgreSQL and Redis (started by the flowcraft_backends plugin), and a
fresh namespace per test: its own queues, runs table and Redis key prefix, all removed
after the test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_rabbitmq import RabbitMQAdapter
from flowcraft_rabbitmq._broker import Broker
from flowcraft_rabbitmq._settings import SqlNames, Topology


@dataclass
class Backends:
    amqp_url: str
    postgres_dsn: str
    redis_url: str


@dataclass
class Namespace:
    """One test's corner of the three servers."""

    backends: Backends
    queue_name: str
    table: str
    key_prefix: str
    adapters: list[RabbitMQAdapter] = field(default_factory=list)

    def options(self, **overrides: Any) -> dict[str, Any]:
        """Constructor options of an adapter in this namespace (fast timings for tests)."""
        options: dict[str, Any] = {
            "amqp_url": self.backends.amqp_url,
            "postgres_dsn": self.backends.postgres_dsn,
            "redis_url": self.backends.redis_url,
            "queue_name": self.queue_name,
            "table": self.table,
            "key_prefix": self.key_prefix,
            "lease_seconds": 3.0,
            "retry_delay_seconds": 0.2,
            "postgres_options": {"min_size": 1, "max_size": 4},
        }
        options.update(overrides)
        return options

    def adapter(self, runtime_options: RuntimeOptions, **overrides: Any) -> RabbitMQAdapter:
        adapter = RabbitMQAdapter(runtime_options=runtime_options, **self.options(**overrides))
        self.adapters.append(adapter)
        return adapter


@pytest.fixture(scope="session")
def backends(
    rabbitmq_service: RunningService,
    postgres_service: RunningService,
    redis_service: RunningService,
) -> Backends:
    return Backends(rabbitmq_service.url, postgres_service.url, redis_service.url)


async def drop_namespace(backends: Backends, queue_name: str, table: str, prefix: str) -> None:
    broker = Broker(Topology.for_queue(queue_name), url=backends.amqp_url)
    try:
        await broker.delete_topology()
    finally:
        await broker.aclose()
    names = SqlNames.create(table)
    conn = await asyncpg.connect(backends.postgres_dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {names.runs}, {names.versions}, {names.leases}")
    finally:
        await conn.close()
    client = redis_asyncio.Redis.from_url(backends.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def namespace(backends: Backends) -> AsyncIterator[Namespace]:
    tag = uuid.uuid4().hex[:12]
    ns = Namespace(backends, f"fc-test-{tag}", f"fc_test_{tag}", f"fc-test:{tag}:")
    yield ns
    for adapter in ns.adapters:
        await adapter.stop()
        await adapter.aclose()
    await drop_namespace(backends, ns.queue_name, ns.table, ns.key_prefix)


@pytest.fixture
def make_adapter(namespace: Namespace) -> Callable[..., RabbitMQAdapter]:
    """``make_adapter(runtime_options, **overrides)``: an adapter in the test's namespace."""
    return namespace.adapter
