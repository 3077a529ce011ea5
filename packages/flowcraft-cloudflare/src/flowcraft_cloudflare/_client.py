"""The HTTP(S) client of the companion Worker: one pooled ``httpx.AsyncClient``.

Every call is one POST of JSON under ``/flowcraft/v1/`` with the shared secret as a
bearer token. ``requests`` counts calls per route, so a benchmark (or a test) can
say how many round trips a node job costs.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from flowcraft.errors import FlowcraftError

__all__ = [
    "WorkerAuthError",
    "WorkerClient",
    "WorkerError",
    "WorkerSettings",
    "worker_dir",
]

logger = logging.getLogger("flowcraft.cloudflare")


def worker_dir() -> Path:
    """The folder holding the companion Worker (``worker.mjs``, ``wrangler.toml``)."""
    return Path(str(resources.files("flowcraft_cloudflare") / "worker"))


class WorkerError(FlowcraftError):
    """The Worker could not be reached or refused a call (the job is handed back)."""


class WorkerAuthError(WorkerError):
    """The Worker refused the shared secret (401)."""


class _TooLarge(WorkerError):
    """The Worker refused a value over the Durable Object's row limit."""

    def __init__(self, key: str, size: int, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.size = size


class WorkerSettings(BaseModel):
    """Where the companion Worker is and how to talk to it.

    ``secret`` is never logged or shown in ``repr``. TLS: ``verify`` (True, False or
    a CA bundle path) and ``cert`` (a client certificate, for mutual TLS behind
    Cloudflare Access or an mTLS rule) go to httpx unchanged.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    url: str
    """The Worker's base URL, e.g. ``https://flowcraft.example.workers.dev``."""
    secret: SecretStr
    verify: bool | str | ssl.SSLContext = True
    cert: str | tuple[str, str] | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=64, ge=1)
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers (e.g. Cloudflare Access service-token headers)."""

    @field_validator("url")
    @classmethod
    def _strip(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("secret")
    @classmethod
    def _non_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value():
            raise ValueError("secret must not be empty")
        return value


def _encode(payload: Any) -> bytes:
    """Compact UTF-8 JSON; text with lone surrogates falls back to ASCII escapes."""
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload, separators=(",", ":")).encode()


class WorkerClient:
    """Calls the Worker; share one per process (its connection pool is the point)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.requests: Counter[str] = Counter()
        """Calls sent, per route (``do``, ``inbox:pull``, ``enqueue``...)."""
        limits = httpx.Limits(
            max_connections=settings.max_connections,
            max_keepalive_connections=settings.max_connections,
        )
        headers = dict(settings.headers)
        headers["authorization"] = f"Bearer {settings.secret.get_secret_value()}"
        headers["content-type"] = "application/json"
        self._http = httpx.AsyncClient(
            base_url=f"{settings.url}/flowcraft/v1/",
            headers=headers,
            verify=settings.verify,
            cert=settings.cert,
            limits=limits,
            timeout=httpx.Timeout(settings.timeout_seconds),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.settings.url!r})"

    async def call(self, route: str, payload: Any, *, label: str | None = None) -> dict[str, Any]:
        """POST ``payload`` to ``route``; the JSON answer, or an error raised."""
        self.requests[label or route] += 1
        content = payload if isinstance(payload, bytes) else _encode(payload)
        try:
            response = await self._http.post(route, content=content)
        except httpx.HTTPError as exc:
            raise WorkerError(f"Worker call {route} failed: {exc!r}") from exc
        try:
            answer: dict[str, Any] = json.loads(response.content)
        except ValueError:
            raise WorkerError(
                f"Worker call {route} answered {response.status_code} with no JSON"
            ) from None
        if response.status_code == 401:
            raise WorkerAuthError("the Worker refused the shared secret (401)")
        if response.status_code == 413 and answer.get("error") == "too_large":
            raise _TooLarge(
                str(answer.get("key", "")), int(answer.get("bytes", 0)), str(answer.get("message"))
            )
        if response.status_code != 200 or "error" in answer:
            raise WorkerError(
                f"Worker call {route} answered {response.status_code}: "
                f"{answer.get('error')}: {answer.get('message', '')}"
            )
        return answer

    async def aclose(self) -> None:
        await self._http.aclose()
