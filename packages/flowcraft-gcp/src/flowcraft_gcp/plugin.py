"""``flowcraft worker --adapter gcp``: settings from ``FLOWCRAFT_GCP_*``; credentials are
Application Default Credentials (the emulators' ``*_EMULATOR_HOST`` variables apply)."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_gcp.adapter import GcpAdapter


class GcpPluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_GCP_")

    redis_url: SecretStr
    """Redis for coordination and results (``rediss://`` for TLS)."""
    project: str | None = None
    topic: str = "flowcraft-jobs"
    collection: str = "flowcraft_runs"
    firestore_database: str | None = None
    create_topology: bool = True


def build(settings: GcpPluginSettings, runtime_options: RuntimeOptions) -> GcpAdapter:
    return GcpAdapter(
        runtime_options=runtime_options,
        redis_url=settings.redis_url.get_secret_value(),
        project=settings.project,
        topic=settings.topic,
        collection=settings.collection,
        firestore_database=settings.firestore_database,
        create_topology=settings.create_topology,
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("gcp", GcpPluginSettings, build, "redis_url", "topic")
