"""``flowcraft worker --adapter cloudflare``: settings from ``FLOWCRAFT_CLOUDFLARE_*``."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_cloudflare._client import WorkerSettings
from flowcraft_cloudflare.adapter import CloudflareAdapter


class CloudflarePluginSettings(AdapterSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWCRAFT_CLOUDFLARE_")

    url: str
    """The deployed flowcraft Worker (``https://``)."""
    secret: SecretStr
    """The Worker's shared secret."""
    verify: bool | str = True
    """TLS verification: on, off, or a CA bundle path."""
    queue_name: str = "flowcraft-jobs"
    namespace: str = "flowcraft"


def build(settings: CloudflarePluginSettings, runtime_options: RuntimeOptions) -> CloudflareAdapter:
    return CloudflareAdapter(
        runtime_options=runtime_options,
        settings=WorkerSettings(url=settings.url, secret=settings.secret, verify=settings.verify),
        queue_name=settings.queue_name,
        namespace=settings.namespace,
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("cloudflare", CloudflarePluginSettings, build, "url", "queue_name")
