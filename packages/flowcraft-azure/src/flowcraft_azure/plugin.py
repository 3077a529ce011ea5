"""``flowcraft worker --adapter azure``: settings from ``FLOWCRAFT_AZURE_*``."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_azure.adapter import AzureAdapter


def _plain(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


class AzurePluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_AZURE_")

    storage_connection_string: SecretStr | None = None
    """Azure Storage (queues): a connection string, or ``storage_account_url``."""
    storage_account_url: SecretStr | None = None
    """With a SAS token in its query, when there is no connection string."""
    cosmos_url: str
    cosmos_key: SecretStr | None = None
    redis_url: SecretStr
    """Redis for coordination and results (``rediss://`` for TLS)."""
    queue_name: str = "flowcraft-jobs"
    database: str = "flowcraft"
    container: str = "runs"
    require_strong_consistency: bool = True
    """False for a single-replica account or the emulator (see the README's *Consistency*)."""
    cosmos_endpoint_discovery: bool = True
    """False for the emulator (its advertised endpoints are not reachable from outside)."""


def build(settings: AzurePluginSettings, runtime_options: RuntimeOptions) -> AzureAdapter:
    return AzureAdapter(
        runtime_options=runtime_options,
        storage_connection_string=_plain(settings.storage_connection_string),
        storage_account_url=_plain(settings.storage_account_url),
        cosmos_url=settings.cosmos_url,
        cosmos_credential=_plain(settings.cosmos_key),
        redis_url=settings.redis_url.get_secret_value(),
        queue_name=settings.queue_name,
        database=settings.database,
        container=settings.container,
        require_strong_consistency=settings.require_strong_consistency,
        cosmos_options=None
        if settings.cosmos_endpoint_discovery
        else {"enable_endpoint_discovery": False},
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("azure", AzurePluginSettings, build, "cosmos_url", "queue_name")
