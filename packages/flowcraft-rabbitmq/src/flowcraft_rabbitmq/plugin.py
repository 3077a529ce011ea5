"""``flowcraft worker --adapter rabbitmq``: settings from ``FLOWCRAFT_RABBITMQ_*``."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_rabbitmq.adapter import RabbitMQAdapter


class RabbitMQPluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_RABBITMQ_")

    url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    """AMQP URL (``amqps://`` for TLS)."""
    postgres_dsn: SecretStr
    redis_url: SecretStr
    queue_name: str = "flowcraft-jobs"
    table: str = "flowcraft_runs"
    schema_name: str | None = None
    prefetch: int | None = Field(default=None, ge=1)
    """Messages RabbitMQ hands a worker ahead (at least ``concurrency``; default equal)."""


def build(settings: RabbitMQPluginSettings, runtime_options: RuntimeOptions) -> RabbitMQAdapter:
    return RabbitMQAdapter(
        runtime_options=runtime_options,
        amqp_url=settings.url.get_secret_value(),
        postgres_dsn=settings.postgres_dsn.get_secret_value(),
        redis_url=settings.redis_url.get_secret_value(),
        queue_name=settings.queue_name,
        table=settings.table,
        schema=settings.schema_name,
        prefetch=settings.prefetch,
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("rabbitmq", RabbitMQPluginSettings, build, "url", "queue_name")
