"""flowcraft on Apache Kafka (jobs), Cassandra (run state) and Redis (coordination)."""

from __future__ import annotations

from flowcraft_kafka._cassandra import (
    DEFAULT_MAX_PATCH_BYTES,
    CassandraClient,
    CassandraRunStore,
    PatchOutcomeUnknownError,
    create_schema,
)
from flowcraft_kafka._kafka import create_topics
from flowcraft_kafka._settings import CassandraSettings, KafkaSettings
from flowcraft_kafka.adapter import KafkaAdapter
from flowcraft_kafka.context import CassandraContext

__all__ = [
    "DEFAULT_MAX_PATCH_BYTES",
    "CassandraClient",
    "CassandraContext",
    "CassandraRunStore",
    "CassandraSettings",
    "KafkaAdapter",
    "KafkaSettings",
    "PatchOutcomeUnknownError",
    "create_schema",
    "create_topics",
]
