"""UNIT TEST (not an integration test): the HTTP pull delivery's request/response
mapping, against a local HTTP server that checks each request against the shapes
Cloudflare documents for Queues' pull consumers (pull, ack with retries and
``delay_seconds``, batch send) and answers in the documented envelope.

Miniflare has no HTTP pull consumer, so nothing here runs against Cloudflare's
queue: what a real queue does with these calls (leases, redelivery, ``attempts``)
is not tested (the README says so). The inbox delivery, the default, is the one the
conformance kit and the crash tests run on Miniflare."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from flowcraft import Flow, RuntimeOptions
from flowcraft_cloudflare import CloudflareAdapter, InboxMessage, WorkerSettings
from flowcraft_cloudflare.pull_consumer import PullConsumer, QueuesApiError, QueuesApiSettings

ACCOUNT = "acc0123456789abcdef"
QUEUE = "q0123456789abcdef"
TOKEN = "token-for-the-unit-test"
PREFIX = f"/client/v4/accounts/{ACCOUNT}/queues/{QUEUE}/messages"


@dataclass
class FakeQueuesApi:
    """Records requests; answers pulls from ``ready``; refuses shapes the docs do not
    describe (a wrong field fails the test through a 400 the client raises on)."""

    ready: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fail_with: dict[str, Any] | None = None

    def last(self) -> tuple[str, dict[str, Any]]:
        return self.requests[-1]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(f"{PREFIX}/pull", self.pull)
        app.router.add_post(f"{PREFIX}/ack", self.ack)
        app.router.add_post(f"{PREFIX}/batch", self.batch)
        return app

    async def _read(self, request: web.Request, allowed: set[str]) -> dict[str, Any]:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["content-type"] == "application/json"
        body: dict[str, Any] = await request.json()
        assert set(body) <= allowed, body
        self.requests.append((request.path.rsplit("/", 1)[1], body))
        return body

    def _answer(self, result: Any) -> web.Response:
        if self.fail_with is not None:
            return web.json_response(
                {"success": False, "errors": [self.fail_with], "messages": [], "result": None},
                status=400,
            )
        return web.json_response({"success": True, "errors": [], "messages": [], "result": result})

    async def pull(self, request: web.Request) -> web.Response:
        body = await self._read(request, {"batch_size", "visibility_timeout"})
        assert isinstance(body["batch_size"], int)
        assert 1 <= body["batch_size"] <= 100
        assert isinstance(body["visibility_timeout"], int)  # milliseconds
        assert 1 <= body["visibility_timeout"] <= 12 * 3600 * 1000
        taken, self.ready = self.ready[: body["batch_size"]], self.ready[body["batch_size"] :]
        return self._answer({"message_backlog_count": len(self.ready), "messages": taken})

    async def ack(self, request: web.Request) -> web.Response:
        body = await self._read(request, {"acks", "retries"})
        for ack in body.get("acks", []):
            assert set(ack) == {"lease_id"}
        for retry in body.get("retries", []):
            assert set(retry) <= {"lease_id", "delay_seconds"}
            assert "lease_id" in retry
            assert 0 < retry.get("delay_seconds", 1) <= 43200
        assert len(body.get("acks", [])) + len(body.get("retries", [])) <= 100
        return self._answer(
            {"ackCount": len(body.get("acks", [])), "retryCount": len(body.get("retries", []))}
        )

    async def batch(self, request: web.Request) -> web.Response:
        body = await self._read(request, {"messages", "delay_seconds"})
        assert 1 <= len(body["messages"]) <= 100
        for message in body["messages"]:
            assert message["content_type"] == "text"
            assert set(message) <= {"body", "content_type", "delay_seconds"}
        return self._answer(None)


def pulled(body: str, lease: str, *, attempts: int = 1, kind: str = "text") -> dict[str, Any]:
    """A message as the pull API returns it (json and bytes bodies base64-encoded)."""
    sent = body if kind == "text" else base64.b64encode(body.encode()).decode()
    return {
        "body": sent,
        "id": f"id-{lease}",
        "timestamp_ms": 1689615013586,
        "attempts": attempts,
        "metadata": {"CF-sourceMessageSource": "api", "CF-Content-Type": kind},
        "lease_id": lease,
    }


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeQueuesApi, str]]:
    fake = FakeQueuesApi()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}/client/v4"
    await runner.cleanup()


def settings(url: str, **kw: Any) -> QueuesApiSettings:
    return QueuesApiSettings(account_id=ACCOUNT, queue_id=QUEUE, api_token=TOKEN, api_url=url, **kw)


async def test_pull_maps_the_documented_request_and_answer(
    api: tuple[FakeQueuesApi, str],
) -> None:
    fake, url = api
    fake.ready = [
        pulled('{"job": 1}', "L1", attempts=2),
        pulled('{"job": 2}', "L2", kind="json"),
        pulled("raw", "L3", kind="bytes"),
    ]
    consumer = PullConsumer(settings(url))
    try:
        got = await consumer.pull(2, visibility_seconds=6)
        assert got == [
            InboxMessage("id-L1", '{"job": 1}', 2, "L1"),
            InboxMessage("id-L2", '{"job": 2}', 1, "L2"),
        ]
        assert fake.last() == ("pull", {"batch_size": 2, "visibility_timeout": 6000})
        (last,) = await consumer.pull(500, visibility_seconds=100_000)
        assert last.body == "raw"
        assert fake.last() == ("pull", {"batch_size": 100, "visibility_timeout": 43_200_000})
        assert await consumer.pull(5, visibility_seconds=1) == []
        assert consumer.requests["queues:pull"] == 3
    finally:
        await consumer.aclose()


async def test_ack_and_retry_map_to_one_ack_call_per_100_leases(
    api: tuple[FakeQueuesApi, str],
) -> None:
    fake, url = api
    consumer = PullConsumer(settings(url))
    msgs = [InboxMessage(f"i{n}", "b", 1, f"L{n}") for n in range(150)]
    try:
        await consumer.settle(acks=msgs[:2], retries=[(msgs[2], 30.0), (msgs[3], 0.0)])
        assert fake.last() == (
            "ack",
            {
                "acks": [{"lease_id": "L0"}, {"lease_id": "L1"}],
                "retries": [{"lease_id": "L2", "delay_seconds": 30.0}, {"lease_id": "L3"}],
            },
        )
        await consumer.settle(retries=[(msgs[4], 10**6)])  # clamped to 12 h
        assert fake.last()[1]["retries"] == [{"lease_id": "L4", "delay_seconds": 43200.0}]
        before = len(fake.requests)
        await consumer.settle(acks=msgs)
        assert [len(r[1]["acks"]) for r in fake.requests[before:]] == [100, 50]
    finally:
        await consumer.aclose()


async def test_send_maps_to_text_batches(api: tuple[FakeQueuesApi, str]) -> None:
    fake, url = api
    consumer = PullConsumer(settings(url))
    try:
        await consumer.send(["a", "b"], delay_seconds=5)
        assert fake.last() == (
            "batch",
            {
                "messages": [
                    {"body": "a", "content_type": "text", "delay_seconds": 5.0},
                    {"body": "b", "content_type": "text", "delay_seconds": 5.0},
                ]
            },
        )
        before = len(fake.requests)
        await consumer.send(["x" * 100_000] * 5)  # 256 KB per batch: 2 + 2 + 1
        assert [len(r[1]["messages"]) for r in fake.requests[before:]] == [2, 2, 1]
    finally:
        await consumer.aclose()


async def test_errors_name_cloudflares_codes_and_no_secret(
    api: tuple[FakeQueuesApi, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    fake.fail_with = {"code": 10000, "message": "Authentication error"}
    consumer = PullConsumer(settings(url))
    try:
        with pytest.raises(QueuesApiError, match="10000: Authentication error") as raised:
            await consumer.pull(1, visibility_seconds=5)
    finally:
        await consumer.aclose()
    shown = f"{raised.value} {consumer!r} {consumer.settings!r} {caplog.text}"
    for secret in (ACCOUNT, QUEUE, TOKEN):
        assert secret not in shown


def test_tls_settings_reach_the_connection() -> None:
    mine = ssl.create_default_context()
    consumer = PullConsumer(settings("https://api.example", verify=mine))
    assert consumer._ssl is mine
    assert PullConsumer(settings("https://api.example", verify=False))._ssl is False
    assert isinstance(PullConsumer(settings("https://api.example"))._ssl, ssl.SSLContext)


def adapter_for(url: str) -> CloudflareAdapter:
    flow = Flow("one").node("a", lambda c: 1)
    return CloudflareAdapter(
        runtime_options=RuntimeOptions.from_flows(flow),
        settings=WorkerSettings(url="http://127.0.0.1:9", secret="unused"),
        delivery="http-pull",
        queues_api=settings(url, max_retries=10),
        poll_seconds=0.05,
        visibility_seconds=120,
    )


async def test_the_adapter_maps_its_queue_calls_to_the_api(
    api: tuple[FakeQueuesApi, str],
) -> None:
    """receive -> pull, ack -> acks, release -> a retry with its delay, renew -> no
    call (the API cannot extend a lease), resend near max_retries -> a fresh copy
    then the old one acked; jobs go out as text batches."""
    fake, url = api
    adapter = adapter_for(url)
    try:
        fake.ready = [pulled("j1", "L1"), pulled("j2", "L2", attempts=9)]
        first, second = await adapter.receive(10)
        assert fake.last() == ("pull", {"batch_size": 10, "visibility_timeout": 120_000})
        assert adapter.message_body(first) == "j1"
        assert adapter.delivery_count(second) == 9
        assert await adapter.receive(10) == []  # an empty pull, then a short wait
        await adapter.ack([first])
        assert fake.last() == ("ack", {"acks": [{"lease_id": "L1"}], "retries": []})
        before = len(fake.requests)
        await adapter.renew(second, 60)
        assert len(fake.requests) == before
        await adapter.release(second, 2.5)
        assert fake.last() == (
            "ack",
            {"acks": [], "retries": [{"lease_id": "L2", "delay_seconds": 2.5}]},
        )
        assert await adapter.redelivery_limit() == 10
        assert await adapter.resend(second, 3)
        assert fake.requests[-2:] == [
            ("batch", {"messages": [{"body": "j2", "content_type": "text", "delay_seconds": 3.0}]}),
            ("ack", {"acks": [{"lease_id": "L2"}], "retries": []}),
        ]
        await adapter.enqueue_raw(b"garbage")
        assert fake.last() == (
            "batch",
            {"messages": [{"body": "garbage", "content_type": "text"}]},
        )
    finally:
        await adapter.aclose()


def test_http_pull_needs_its_settings() -> None:
    options = RuntimeOptions.from_flows(Flow("one").node("a", lambda c: 1))
    worker = WorkerSettings(url="http://127.0.0.1:9", secret="s")
    with pytest.raises(ValueError, match="queues_api"):
        CloudflareAdapter(runtime_options=options, settings=worker, delivery="http-pull")
    with pytest.raises(ValueError, match="queues_api"):
        CloudflareAdapter(
            runtime_options=options, settings=worker, queues_api=settings("https://a.example")
        )
    assert json.dumps(settings("https://a.example").model_dump(mode="json")).count("**") >= 3


async def test_the_cli_plugin_builds_http_pull_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flowcraft.adapters import build_adapter

    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_SECRET", "s")
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_DELIVERY", "http-pull")
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_ACCOUNT_ID", ACCOUNT)
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_QUEUE_ID", QUEUE)
    options = RuntimeOptions.from_flows(Flow("one").node("a", lambda c: 1))
    with pytest.raises(ValueError, match="FLOWCRAFT_CLOUDFLARE_API_TOKEN"):
        build_adapter("cloudflare", options)
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_API_TOKEN", TOKEN)
    monkeypatch.setenv("FLOWCRAFT_CLOUDFLARE_MAX_RETRIES", "100")
    adapter, plugin, settings = build_adapter("cloudflare", options)
    try:
        assert isinstance(adapter, CloudflareAdapter)
        assert adapter.pull_consumer is not None
        assert await adapter.redelivery_limit() == 100
        shown = f"{settings!r} {plugin.describe(settings)} {adapter!r}"
        for secret in (ACCOUNT, QUEUE, TOKEN):
            assert secret not in shown
    finally:
        await adapter.aclose()
