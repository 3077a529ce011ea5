"""The HTTP(S) client of the companion Worker: one pooled ``aiohttp.ClientSession``.

Every call is one POST of JSON under ``/flowcraft/v1/`` with the shared secret as a
bearer token. ``requests`` counts calls per route, so a benchmark (or a test) can
say how many round trips a node job costs.
"""

from __future__ import annotations

import io
import json
import logging
import ssl
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import aiohttp
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

    ``secret`` is never logged or shown in ``repr``. TLS: ``verify`` (True, False, a
    CA bundle path or an ``ssl.SSLContext``) and ``cert`` (a client certificate file,
    or (certificate, key) files, for mutual TLS behind an mTLS rule) make the
    ``ssl.SSLContext`` every connection uses.
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


class _TlsSettings(Protocol):
    @property
    def verify(self) -> bool | str | ssl.SSLContext: ...
    @property
    def cert(self) -> str | tuple[str, str] | None: ...


def _ssl_context(settings: _TlsSettings) -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` gets: the settings' context, or one made from them."""
    verify = settings.verify
    if isinstance(verify, ssl.SSLContext):
        context = verify
    elif verify is False:
        if settings.cert is None:
            return False
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        cafile = verify if isinstance(verify, str) else None
        context = ssl.create_default_context(cafile=cafile)
    if settings.cert is not None:
        certfile, keyfile = (
            (settings.cert, None) if isinstance(settings.cert, str) else settings.cert
        )
        context.load_cert_chain(certfile, keyfile)
    return context


class WorkerClient:
    """Calls the Worker; share one per process (its connection pool is the point).

    The session is made on the first call, inside the running event loop."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.requests: Counter[str] = Counter()
        """Calls sent, per route (``do``, ``inbox:pull``, ``enqueue``...)."""
        headers = dict(settings.headers)
        headers["authorization"] = f"Bearer {settings.secret.get_secret_value()}"
        headers["content-type"] = "application/json"
        self._headers = headers
        self._base = f"{settings.url}/flowcraft/v1/"
        self._ssl = _ssl_context(settings) if settings.url.startswith("https://") else False
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise WorkerError("this WorkerClient is closed")
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.max_connections, ssl=self._ssl)
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_seconds),
                raise_for_status=False,
            )
        return self._session

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.settings.url!r})"

    async def call(
        self, route: str, payload: Any, *, label: str | None = None, retry: bool = True
    ) -> dict[str, Any]:
        """POST ``payload`` to ``route``; the JSON answer, or an error raised.

        A connection that fails before an answer is tried once more on a new one when
        the call is safe to repeat (``retry``): the server may close a pooled keep-alive
        connection just as a request goes out on it. A call whose repetition would
        change its answer (increment, set-if-absent, a guarded patch) is not repeated
        after the request may have been sent: its error goes to the caller (the job is
        handed back), since the first attempt may have been applied."""
        self.requests[label or route] += 1
        content = payload if isinstance(payload, bytes) else _encode(payload)
        try:
            try:
                status, body = await self._post(route, content)
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
                # ClientOSError: a reset connection (or, as ClientConnectorError, none at all).
                if not (retry or isinstance(exc, aiohttp.ClientConnectorError)):
                    raise
                logger.debug("Worker call %s: %r; trying once more", route, exc)
                status, body = await self._post(route, content)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise WorkerError(f"Worker call {route} failed: {exc!r}") from exc
        try:
            answer: dict[str, Any] = json.loads(body)
        except ValueError:
            raise WorkerError(f"Worker call {route} answered {status} with no JSON") from None
        if status == 401:
            raise WorkerAuthError("the Worker refused the shared secret (401)")
        if status == 413 and answer.get("error") == "too_large":
            raise _TooLarge(
                str(answer.get("key", "")), int(answer.get("bytes", 0)), str(answer.get("message"))
            )
        if status != 200 or "error" in answer:
            raise WorkerError(
                f"Worker call {route} answered {status}: "
                f"{answer.get('error')}: {answer.get('message', '')}"
            )
        return answer

    async def _post(self, route: str, content: bytes) -> tuple[int, bytes]:
        # aiohttp warns that a large body given as bytes blocks the loop; a stream is not.
        data: bytes | io.BytesIO = io.BytesIO(content) if len(content) > 512 * 1024 else content
        async with self._open().post(self._base + route, data=data) as response:
            return response.status, await response.read()

    async def aclose(self) -> None:
        """Close the connection pool; later calls raise ``WorkerError``."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
