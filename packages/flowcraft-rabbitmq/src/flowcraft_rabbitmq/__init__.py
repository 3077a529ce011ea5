"""flowcraft on RabbitMQ (jobs), PostgreSQL (run state) and Redis (coordination)."""

from __future__ import annotations

from flowcraft_rabbitmq._store import SCHEMA_VERSION, PostgresRunStore
from flowcraft_rabbitmq.adapter import RabbitMQAdapter
from flowcraft_rabbitmq.context import PostgresContext

__all__ = [
    "SCHEMA_VERSION",
    "PostgresContext",
    "PostgresRunStore",
    "RabbitMQAdapter",
]
