"""``flowcraft worker --adapter bullmq``: settings from ``FLOWCRAFT_BULLMQ_*``."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_bullmq.adapter import BullMQAdapter


class BullMQPluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_BULLMQ_")

    url: SecretStr = SecretStr("redis://localhost:6379/0")
    """Redis URL (``rediss://`` with ``ssl_*`` query parameters for TLS)."""
    queue_name: str = "flowcraft"


def build(settings: BullMQPluginSettings, runtime_options: RuntimeOptions) -> BullMQAdapter:
    return BullMQAdapter(
        runtime_options=runtime_options,
        connection=settings.url.get_secret_value(),
        queue_name=settings.queue_name,
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("bullmq", BullMQPluginSettings, build, "url", "queue_name")
