"""``flowcraft worker --adapter cloudflare``: settings from ``FLOWCRAFT_CLOUDFLARE_*``."""

from __future__ import annotations

from typing import Literal

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from flowcraft.adapters import AdapterPlugin, AdapterSettings
from flowcraft.runtime import RuntimeOptions
from flowcraft_cloudflare._client import WorkerSettings
from flowcraft_cloudflare.adapter import CloudflareAdapter
from flowcraft_cloudflare.pull_consumer import QueuesApiSettings


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
    delivery: Literal["inbox", "http-pull"] = "inbox"
    """``http-pull``: pull the Cloudflare Queue through Cloudflare's REST API."""
    account_id: SecretStr | None = None
    """``http-pull``: the Cloudflare account id."""
    queue_id: SecretStr | None = None
    """``http-pull``: the queue's id."""
    api_token: SecretStr | None = None
    """``http-pull``: an API token with Queues Edit permission."""
    max_retries: int = 3
    """``http-pull``: the pull consumer's ``max_retries``."""


def queues_api(settings: CloudflarePluginSettings) -> QueuesApiSettings | None:
    """The REST API's settings for ``delivery=http-pull``, each named if missing."""
    if settings.delivery != "http-pull":
        return None
    given = {"account_id": settings.account_id, "queue_id": settings.queue_id}
    given["api_token"] = settings.api_token
    missing = [f"FLOWCRAFT_CLOUDFLARE_{k.upper()}" for k, v in given.items() if v is None]
    if missing:
        raise ValueError(f"delivery=http-pull needs {', '.join(missing)}")
    return QueuesApiSettings(
        account_id=settings.account_id,
        queue_id=settings.queue_id,
        api_token=settings.api_token,
        max_retries=settings.max_retries,
        verify=settings.verify,
    )


def build(settings: CloudflarePluginSettings, runtime_options: RuntimeOptions) -> CloudflareAdapter:
    return CloudflareAdapter(
        runtime_options=runtime_options,
        settings=WorkerSettings(url=settings.url, secret=settings.secret, verify=settings.verify),
        queue_name=settings.queue_name,
        namespace=settings.namespace,
        delivery=settings.delivery,
        queues_api=queues_api(settings),
        **settings.base_options(),
    )


ADAPTER = AdapterPlugin("cloudflare", CloudflarePluginSettings, build, "url", "queue_name")
