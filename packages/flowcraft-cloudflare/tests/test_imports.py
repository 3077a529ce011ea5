"""The public surface of flowcraft_cloudflare, pinned."""

from __future__ import annotations

import flowcraft_cloudflare

EXPECTED = {
    "MAX_DELAY_SECONDS",
    "MAX_MESSAGE_BYTES",
    "MAX_VALUE_BYTES",
    "CloudflareAdapter",
    "DeadLetter",
    "DurableObjectContext",
    "DurableObjectCoordinationStore",
    "Inbox",
    "InboxMessage",
    "InboxStats",
    "PullConsumer",
    "QueuesApiError",
    "QueuesApiSettings",
    "WorkerAuthError",
    "WorkerClient",
    "WorkerError",
    "WorkerSettings",
    "run_object",
    "worker_dir",
}


def test_all_is_pinned() -> None:
    assert set(flowcraft_cloudflare.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(flowcraft_cloudflare, name) is not None


def test_adapter_is_a_distributed_adapter() -> None:
    from flowcraft.distributed.adapter import BaseDistributedAdapter

    assert issubclass(flowcraft_cloudflare.CloudflareAdapter, BaseDistributedAdapter)


async def test_store_satisfies_the_protocol() -> None:
    from flowcraft.distributed import CoordinationStore

    client = flowcraft_cloudflare.WorkerClient(
        flowcraft_cloudflare.WorkerSettings(url="https://example.invalid", secret="s")
    )
    try:
        store = flowcraft_cloudflare.DurableObjectCoordinationStore(client)
        assert isinstance(store, CoordinationStore)
    finally:
        await client.aclose()


def test_the_worker_ships_inside_the_package() -> None:
    folder = flowcraft_cloudflare.worker_dir()
    for name in ("worker.mjs", "wrangler.toml", "miniflare.json"):
        assert (folder / name).is_file(), name


def test_secret_is_not_in_repr() -> None:
    settings = flowcraft_cloudflare.WorkerSettings(url="https://w.example/", secret="hunter2")
    assert "hunter2" not in repr(settings)
    assert settings.url == "https://w.example"


def test_tls_settings_reach_the_connection_context() -> None:
    import ssl

    from flowcraft_cloudflare._client import _ssl_context

    settings = flowcraft_cloudflare.WorkerSettings
    assert _ssl_context(settings(url="https://w.example", secret="s", verify=False)) is False
    default = _ssl_context(settings(url="https://w.example", secret="s"))
    assert isinstance(default, ssl.SSLContext)
    assert default.verify_mode == ssl.CERT_REQUIRED
    assert default.check_hostname
    mine = ssl.create_default_context()
    assert _ssl_context(settings(url="https://w.example", secret="s", verify=mine)) is mine
    # Plain http (Miniflare on loopback) gets no TLS at all.
    client = flowcraft_cloudflare.WorkerClient(settings(url="http://127.0.0.1:1", secret="s"))
    assert client._ssl is False
