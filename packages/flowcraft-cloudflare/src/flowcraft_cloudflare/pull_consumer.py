"""Cloudflare Queues' HTTP pull consumer, for ``CloudflareAdapter(delivery="http-pull")``.

Python pulls the Cloudflare Queue itself through Cloudflare's REST API instead of
through the Worker's inbox object: ``POST .../queues/{queue_id}/messages/pull``
(``batch_size``, ``visibility_timeout`` in ms), ``.../messages/ack`` (``acks`` and
``retries`` by ``lease_id``, a retry with ``delay_seconds``) and
``.../messages/batch`` to send (``content_type: "text"``). The queue needs an HTTP
pull consumer (``type = "http_pull"``) instead of the Worker's ``queue()`` handler;
run state and coordination still go through the Worker.

What it cannot do, unlike the inbox: extend a pulled message's lease (the API has
none: pull with a ``visibility_seconds`` above the longest node; a message that
reappears while its node runs finds the activation's lease busy and is handed back)
and long-poll (an empty pull answers at once; the adapter waits ``poll_seconds``).
A retry counts as an attempt toward the consumer's ``max_retries``; the adapter
re-sends a handed-back job near that limit (see ``PullingAdapter.resend``).

Tested by a unit test against a local HTTP server that checks the documented
request shapes (``tests/test_http_pull_unit.py``), not against Cloudflare: Miniflare
has no HTTP pull consumer.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections import Counter
from collections.abc import Sequence
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from flowcraft_cloudflare._client import WorkerError, _encode, _ssl_context
from flowcraft_cloudflare.inbox import MAX_DELAY_SECONDS, InboxMessage

__all__ = ["PullConsumer", "QueuesApiError", "QueuesApiSettings"]

logger = logging.getLogger("flowcraft.cloudflare")

MAX_BATCH = 100
"""Messages per pull, per ack call and per send batch (the API's limit)."""
_MAX_BATCH_BYTES = 250_000
"""A send batch stays under the API's 256 KB."""


class QueuesApiError(WorkerError):
    """Cloudflare's API refused a call or could not be reached (the job is handed back)."""


class QueuesApiSettings(BaseModel):
    """Cloudflare's Queues REST API: the account, the queue and an API token with
    Queues read and write (Edit) permission. The three are secrets: none appears in a
    ``repr``, a log line or an error message (the URL holds two of them). TLS:
    ``verify`` and ``cert`` as in :class:`~flowcraft_cloudflare.WorkerSettings`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    account_id: SecretStr
    queue_id: SecretStr
    api_token: SecretStr
    api_url: str = "https://api.cloudflare.com/client/v4"
    max_retries: int = Field(default=3, ge=0, le=100)
    """The pull consumer's ``max_retries`` (Cloudflare's default 3; at most 100): a
    handed-back job is re-sent before its attempts reach it."""
    verify: bool | str | ssl.SSLContext = True
    cert: str | tuple[str, str] | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=32, ge=1)

    @field_validator("api_url")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("api_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("account_id", "queue_id", "api_token")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("must not be empty")
        return value


def _body_text(message: dict[str, Any]) -> str:
    """The body as text: ``text`` messages arrive as they were sent; ``json`` and
    ``bytes`` ones base64-encoded (the API's content types)."""
    body = message.get("body")
    if body is None:
        return ""
    metadata = message.get("metadata") or {}
    kind = metadata.get("CF-Content-Type", "text") if isinstance(metadata, dict) else "text"
    if kind in ("json", "bytes") and isinstance(body, str):
        try:
            return base64.b64decode(body, validate=True).decode("utf-8", "replace")
        except ValueError:
            return body
    return body if isinstance(body, str) else json.dumps(body)


class PullConsumer:
    """Pulls, acks, retries and sends on one Cloudflare Queue over its REST API.

    One pooled ``aiohttp`` session, made on the first call. ``requests`` counts calls
    per kind (``queues:pull``, ``queues:ack``, ``queues:send``)."""

    def __init__(self, settings: QueuesApiSettings) -> None:
        self.settings = settings
        self.requests: Counter[str] = Counter()
        account = settings.account_id.get_secret_value()
        queue = settings.queue_id.get_secret_value()
        self._base = f"{settings.api_url}/accounts/{account}/queues/{queue}/messages"
        self._headers = {
            "authorization": f"Bearer {settings.api_token.get_secret_value()}",
            "content-type": "application/json",
        }
        self._ssl = _ssl_context(settings) if settings.api_url.startswith("https://") else False
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(api_url={self.settings.api_url!r})"

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise QueuesApiError("this PullConsumer is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
            )
        return self._session

    async def _post(self, action: str, payload: dict[str, Any]) -> Any:
        """POST to ``.../messages[/action]``; the envelope's ``result``. Errors name the
        action and Cloudflare's error codes, never the URL (it holds the account and
        queue ids)."""
        self.requests[f"queues:{action or 'send'}"] += 1
        url = f"{self._base}/{action}" if action else self._base
        try:
            async with self._open().post(url, data=_encode(payload)) as response:
                status, raw = response.status, await response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise QueuesApiError(f"Queues API {action or 'send'}: {type(exc).__name__}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise QueuesApiError(f"Queues API {action} answered {status} with no JSON") from None
        if status != 200 or not answer.get("success", False):
            errors = [
                f"{e.get('code')}: {e.get('message')}"
                for e in answer.get("errors") or []
                if isinstance(e, dict)
            ]
            raise QueuesApiError(f"Queues API {action} answered {status}: {'; '.join(errors)}")
        return answer.get("result")

    async def pull(self, max_messages: int, *, visibility_seconds: float) -> list[InboxMessage]:
        """Up to ``max_messages`` (at most 100), each leased ``visibility_seconds``
        (at most 12 h); an empty list at once when none is ready (short polling)."""
        if max_messages < 1:
            return []
        visibility_ms = int(min(max(visibility_seconds, 0.001), MAX_DELAY_SECONDS) * 1000)
        result = await self._post(
            "pull",
            {"batch_size": min(max_messages, MAX_BATCH), "visibility_timeout": visibility_ms},
        )
        found = (result or {}).get("messages") or []
        return [
            InboxMessage(
                str(m["id"]), _body_text(m), int(m.get("attempts") or 1), str(m["lease_id"])
            )
            for m in found[:max_messages]
        ]

    async def settle(
        self,
        acks: Sequence[InboxMessage] = (),
        retries: Sequence[tuple[InboxMessage, float]] = (),
    ) -> None:
        """Ack ``acks`` and retry ``retries`` (each after its delay, at most 12 h), 100
        leases a call."""
        items: list[tuple[str, dict[str, Any]]] = [("acks", {"lease_id": m.lease}) for m in acks]
        for message, delay in retries:
            entry: dict[str, Any] = {"lease_id": message.lease}
            seconds = max(0.0, min(float(delay), MAX_DELAY_SECONDS))
            if seconds:
                entry["delay_seconds"] = seconds
            items.append(("retries", entry))
        for start in range(0, len(items), MAX_BATCH):
            body: dict[str, list[dict[str, Any]]] = {"acks": [], "retries": []}
            for kind, entry in items[start : start + MAX_BATCH]:
                body[kind].append(entry)
            await self._post("ack", body)

    async def send(self, bodies: Sequence[str], *, delay_seconds: float = 0) -> None:
        """Send text messages, 100 (and under 256 KB) a call."""
        delay = max(0.0, min(float(delay_seconds), MAX_DELAY_SECONDS))
        batch: list[dict[str, Any]] = []
        size = 0
        for body in bodies:
            item: dict[str, Any] = {"body": body, "content_type": "text"}
            if delay:
                item["delay_seconds"] = delay
            length = len(body.encode("utf-8", "surrogatepass")) + 64
            if batch and (len(batch) == MAX_BATCH or size + length > _MAX_BATCH_BYTES):
                await self._post("batch", {"messages": batch})
                batch, size = [], 0
            batch.append(item)
            size += length
        if batch:
            await self._post("batch", {"messages": batch})

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
