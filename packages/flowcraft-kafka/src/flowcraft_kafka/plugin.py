"""``flowcraft worker --adapter kafka``: settings from ``FLOWCRAFT_KAFKA_*`` (the
``kafka_config`` dict, JSON in its variable, goes to every librdkafka client: TLS and
SASL settings live there)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_kafka._settings import CassandraSettings, KafkaSettings
from flowcraft_kafka.adapter import KafkaAdapter


class KafkaPluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_KAFKA_")

    bootstrap_servers: str = "localhost:9092"
    topic: str = "flowcraft-jobs"
    group_id: str = "flowcraft-workers"
    kafka_config: dict[str, str | int | bool] = Field(default_factory=dict, repr=False)
    redis_url: SecretStr
    """Redis for coordination and results (``rediss://`` for TLS)."""
    cassandra_contact_points: str = "127.0.0.1"
    """Comma-separated hosts."""
    cassandra_port: int = 9042
    cassandra_local_datacenter: str = "datacenter1"
    cassandra_keyspace: str = "flowcraft"
    cassandra_username: str | None = None
    cassandra_password: SecretStr | None = None
    namespace: str = "flowcraft"


def build(settings: KafkaPluginSettings, runtime_options: RuntimeOptions) -> KafkaAdapter:
    s = settings
    return KafkaAdapter(
        runtime_options=runtime_options,
        kafka=KafkaSettings(
            bootstrap_servers=s.bootstrap_servers,
            topic=s.topic,
            group_id=s.group_id,
            kafka_config=dict(s.kafka_config),
        ),
        cassandra=CassandraSettings(
            contact_points=tuple(h.strip() for h in s.cassandra_contact_points.split(",")),
            port=s.cassandra_port,
            local_datacenter=s.cassandra_local_datacenter,
            keyspace=s.cassandra_keyspace,
            username=s.cassandra_username,
            password=s.cassandra_password,
        ),
        redis_url=s.redis_url.get_secret_value(),
        namespace=s.namespace,
        **s.base_options(),
    )


ADAPTER = AdapterPlugin("kafka", KafkaPluginSettings, build, "bootstrap_servers", "topic")
