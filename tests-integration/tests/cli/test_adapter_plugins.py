"""Every stable adapter package registers itself in the ``flowcraft.adapters`` group and
builds its adapter from ``FLOWCRAFT_<NAME>_*`` settings."""

from __future__ import annotations

import pytest

from flowcraft import Flow
from flowcraft.adapters import available_adapters, build_adapter, load_adapter, read_settings
from flowcraft.runtime import RuntimeOptions

OPTIONS = RuntimeOptions.from_flows(Flow("one").node("a", lambda ctx: 1))


@pytest.mark.parametrize(
    "name", ["bullmq", "rabbitmq", "sqs", "gcp", "kafka", "azure", "cloudflare"]
)
def test_installed_adapters_are_found_by_name(name: str) -> None:
    assert name in available_adapters()
    plugin = load_adapter(name)
    assert plugin.name == name
    assert plugin.env_var("concurrency") == f"FLOWCRAFT_{name.upper()}_CONCURRENCY"


async def test_bullmq_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_BULLMQ_URL", "redis://:pw@127.0.0.1:1/0")
    monkeypatch.setenv("FLOWCRAFT_BULLMQ_CONCURRENCY", "3")
    adapter, plugin, settings = build_adapter("bullmq", OPTIONS, {"queue_name": "q1"})
    try:
        assert adapter.settings.concurrency == 3  # type: ignore[attr-defined]
        assert adapter.settings.queue_name == "q1"  # type: ignore[attr-defined]
        assert plugin.describe(settings) == {"url": "redis://***@127.0.0.1:1/0", "queue": "q1"}
    finally:
        await adapter.close()


async def test_sqs_is_built_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_SQS_QUEUE_URL", "http://127.0.0.1:1/000000000000/jobs")
    monkeypatch.setenv("FLOWCRAFT_SQS_REGION_NAME", "us-east-1")
    monkeypatch.setenv("FLOWCRAFT_SQS_WAIT_TIME_SECONDS", "2")
    adapter, _, _ = build_adapter("sqs", OPTIONS, {"concurrency": "5"})
    try:
        assert adapter.queue_url.endswith("/jobs")  # type: ignore[attr-defined]
        assert adapter.wait_time_seconds == 2  # type: ignore[attr-defined]
        assert adapter.concurrency == 5  # type: ignore[attr-defined]
    finally:
        await adapter.close()


def test_rabbitmq_requires_its_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("FLOWCRAFT_RABBITMQ_POSTGRES_DSN", "FLOWCRAFT_RABBITMQ_REDIS_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(Exception, match="FLOWCRAFT_RABBITMQ_POSTGRES_DSN"):
        read_settings(load_adapter("rabbitmq"))


def test_gcp_requires_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWCRAFT_GCP_REDIS_URL", raising=False)
    with pytest.raises(Exception, match="FLOWCRAFT_GCP_REDIS_URL"):
        read_settings(load_adapter("gcp"))


async def test_kafka_cloudflare_and_azure_are_built_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret = "s3cr3t-v4lue"
    monkeypatch.setenv("FLOWCRAFT_KAFKA_REDIS_URL", f"redis://:{secret}@127.0.0.1:1/0")
    monkeypatch.setenv("FLOWCRAFT_KAFKA_KAFKA_CONFIG", f'{{"sasl.password": "{secret}"}}')
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_SECRET", secret)
    monkeypatch.setenv(
        "FLOWCRAFT_AZURE_STORAGE_CONNECTION_STRING",
        f"DefaultEndpointsProtocol=http;AccountName=dev;AccountKey={AZURE_KEY};"
        "QueueEndpoint=http://127.0.0.1:1/dev;",
    )
    monkeypatch.setenv("FLOWCRAFT_AZURE_COSMOS_URL", "https://127.0.0.1:2")
    monkeypatch.setenv("FLOWCRAFT_AZURE_COSMOS_KEY", AZURE_KEY)
    monkeypatch.setenv("FLOWCRAFT_AZURE_REDIS_URL", "redis://127.0.0.1:1/0")
    for name in ("kafka", "cloudflare", "azure"):
        adapter, plugin, settings = build_adapter(name, OPTIONS, {"concurrency": "3"})
        try:
            assert adapter.concurrency == 3  # type: ignore[attr-defined]
            assert secret not in repr(settings)
            assert AZURE_KEY not in repr(settings)
            assert secret not in str(plugin.describe(settings))
        finally:
            await adapter.close()


AZURE_KEY = "a2V5LW5vdC11c2VkLWJ5LWFueS1yZWFsLWFjY291bnQ="
