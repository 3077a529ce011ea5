"""Connection settings for Kafka and Cassandra, validated once.

Names that end up in CQL text (keyspace, table prefix) are configuration, never
run data: they must match a strict identifier pattern and are the only text the
package formats into CQL. Run ids, keys and values always travel as bind values.

Credentials are ``SecretStr`` (never printed by ``repr``) and TLS options are
passed through to every client: ``kafka_config`` goes to every librdkafka client
(producer, consumer, admin) as it is, ``ssl_context`` and ``auth`` to the
Cassandra ``Cluster``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["CassandraSettings", "KafkaSettings"]

_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]{0,47}")


class KafkaSettings(BaseModel):
    """Where the job topic lives and how to reach it.

    ``kafka_config`` is merged into every librdkafka client's configuration
    (``security.protocol``, ``ssl.ca.location``, ``sasl.mechanism``,
    ``sasl.username``, ``sasl.password``...); it is never logged.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: str = Field(min_length=1)
    topic: str = Field(default="flowcraft-jobs", pattern=r"^[A-Za-z0-9._-]{1,200}$")
    dead_letter_topic: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    group_id: str = Field(default="flowcraft-workers", min_length=1)
    kafka_config: dict[str, Any] = Field(default_factory=dict, repr=False)
    consumer_config: dict[str, Any] = Field(default_factory=dict, repr=False)
    """Only for the job consumer (``session.timeout.ms``, ``max.poll.interval.ms``...)."""
    producer_config: dict[str, Any] = Field(default_factory=dict, repr=False)
    """Only for the producer (``linger.ms``, ``compression.type``...)."""

    @property
    def dead_letters(self) -> str:
        """The dead-letter topic: as given, else ``<topic>.dlt``."""
        return self.dead_letter_topic or f"{self.topic}.dlt"


class CassandraSettings(BaseModel):
    """The Cassandra cluster, keyspace and table prefix of the run state.

    ``ssl_context`` (an ``ssl.SSLContext``) and ``username``/``password`` go to the
    driver's ``Cluster``; ``cluster_options`` adds any other ``Cluster`` argument.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    contact_points: tuple[str, ...] = ("127.0.0.1",)
    port: int = Field(default=9042, ge=1, le=65535)
    local_datacenter: str = "datacenter1"
    keyspace: str = "flowcraft"
    table_prefix: str = "flowcraft"
    username: str | None = None
    password: SecretStr | None = None
    ssl_context: Any = Field(default=None, repr=False)
    protocol_version: int = Field(default=5, ge=3, le=5)
    """5 for Cassandra 4 and 5; 4 for Cassandra 3."""
    request_timeout: float = Field(default=10.0, gt=0)
    consistency: str = Field(default="LOCAL_QUORUM", pattern=r"^[A-Z_]+$")
    serial_consistency: str = Field(default="LOCAL_SERIAL", pattern=r"^(SERIAL|LOCAL_SERIAL)$")
    cluster_options: dict[str, Any] = Field(default_factory=dict, repr=False)

    @field_validator("keyspace", "table_prefix")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _IDENTIFIER.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a plain CQL identifier ([a-z][a-z0-9_]*, at most 48)"
            )
        return value

    @classmethod
    def from_address(cls, address: str, **options: Any) -> CassandraSettings:
        """Settings from ``host:port`` (an address as tests and env vars give it)."""
        host, _, port = address.rpartition(":")
        if not host:
            return cls(contact_points=(address,), **options)
        return cls(contact_points=(host,), port=int(port), **options)
