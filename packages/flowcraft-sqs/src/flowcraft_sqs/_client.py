"""AWS settings and clients: one boto3 session, an SQS and a DynamoDB client, a thread pool.

boto3 is synchronous. Every call runs on a bounded thread pool so the event loop
stays free; boto3 *clients* are thread-safe (resources are not, so none is used).
:class:`AwsClients` also counts the API calls it makes (for the benchmark and
for operators who pay per request).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["AwsClients", "AwsSettings"]

logger = logging.getLogger("flowcraft.sqs")

# DynamoDB's limit for a partition key value; longer ids are hashed (see item_key).
MAX_KEY_BYTES = 2048


class AwsSettings(BaseModel):
    """How to reach AWS (or a stand-in such as moto or LocalStack).

    Anything left ``None`` falls back to boto3's usual chain (environment,
    ``~/.aws``, instance role). Secrets are ``SecretStr``: they never appear in
    ``repr`` or logs.

    Args:
        region_name: e.g. ``eu-west-1``.
        endpoint_url: one endpoint for both services (moto, LocalStack).
        sqs_endpoint_url / dynamodb_endpoint_url: per-service endpoints (win over
            ``endpoint_url``).
        profile_name: a named profile from ``~/.aws``.
        aws_access_key_id / aws_secret_access_key / aws_session_token: explicit keys.
        verify: TLS verification: ``True`` (default), ``False``, or a CA bundle path.
        client_cert: a client certificate for mutual TLS: a path, or (cert, key).
        max_pool_connections: HTTP connections per client and threads in the pool.
        connect_timeout / read_timeout: seconds (the read timeout must exceed the
            long-poll wait).
        max_attempts: botocore's retries of throttled or failed requests
            (``standard`` retry mode).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    region_name: str | None = None
    endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    dynamodb_endpoint_url: str | None = None
    profile_name: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_session_token: SecretStr | None = None
    verify: bool | str | None = None
    client_cert: str | tuple[str, str] | None = None
    max_pool_connections: int = Field(default=32, ge=1, le=1000)
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)

    def botocore_config(self) -> Config:
        return Config(
            max_pool_connections=self.max_pool_connections,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"mode": "standard", "max_attempts": self.max_attempts},
            client_cert=self.client_cert,
        )


def _secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


class AwsClients:
    """An SQS client, a DynamoDB client and the thread pool their calls run on.

    Share one instance between an adapter, its context store and its coordination
    store; whoever created it closes it (:meth:`close`).

    ``api_calls`` counts requests per ``service.Operation`` (retries of one
    request are not counted twice).
    """

    def __init__(self, settings: AwsSettings | None = None) -> None:
        self.settings = settings or AwsSettings()
        s = self.settings
        session = boto3.session.Session(
            aws_access_key_id=s.aws_access_key_id,
            aws_secret_access_key=_secret(s.aws_secret_access_key),
            aws_session_token=_secret(s.aws_session_token),
            region_name=s.region_name,
            profile_name=s.profile_name,
        )
        config = s.botocore_config()
        self.sqs: Any = session.client(
            "sqs",
            endpoint_url=s.sqs_endpoint_url or s.endpoint_url,
            verify=s.verify,
            config=config,
        )
        self.dynamodb: Any = session.client(
            "dynamodb",
            endpoint_url=s.dynamodb_endpoint_url or s.endpoint_url,
            verify=s.verify,
            config=config,
        )
        self.api_calls: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        for client in (self.sqs, self.dynamodb):
            client.meta.events.register("before-call.*.*", self._count)
        self._executor = ThreadPoolExecutor(
            max_workers=s.max_pool_connections, thread_name_prefix="flowcraft-aws"
        )
        self._closed = False
        # Never log the settings whole: they may hold keys.
        logger.debug(
            "AWS clients ready (region=%s, endpoint=%s)", s.region_name, s.endpoint_url or "AWS"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(region={self.settings.region_name!r})"

    def _count(self, model: Any, **_: Any) -> None:
        name = f"{model.service_model.service_name}.{model.name}"
        with self._count_lock:
            self.api_calls[name] += 1

    def total_api_calls(self) -> int:
        with self._count_lock:
            return sum(self.api_calls.values())

    def reset_api_calls(self) -> None:
        with self._count_lock:
            self.api_calls.clear()

    async def call(self, client: Any, operation: str, /, **params: Any) -> dict[str, Any]:
        """Run ``client.operation(**params)`` on the pool and return its response."""
        response: dict[str, Any] = await self.run(
            functools.partial(getattr(client, operation), **params)
        )
        return response

    async def run(self, fn: functools.partial[Any]) -> Any:
        """Run a blocking function on the pool."""
        if self._closed:
            raise RuntimeError("AwsClients is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def sqs_call(self, operation: str, /, **params: Any) -> dict[str, Any]:
        return await self.call(self.sqs, operation, **params)

    async def dynamodb_call(self, operation: str, /, **params: Any) -> dict[str, Any]:
        return await self.call(self.dynamodb, operation, **params)

    def close(self) -> None:
        """Stop the pool (without waiting for a long poll) and close the HTTP pools."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        for client in (self.sqs, self.dynamodb):
            client.close()


def error_code(exc: BaseException) -> str:
    """The AWS error code of a ``ClientError`` (``""`` for anything else)."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def is_conditional_failure(exc: BaseException) -> bool:
    return error_code(exc) == "ConditionalCheckFailedException"


def item_key(namespace: str, kind: str, ident: str) -> str:
    """The partition key of an item: ``namespace/kind/ident``.

    An id too long for DynamoDB's 2048-byte key limit is replaced by its SHA-256
    under ``namespace/kind#/``, a form no plain id can take, so keys stay unique.
    """
    raw = f"{namespace}/{kind}/{ident}"
    if len(raw.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
        return raw
    digest = hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{namespace}/{kind}#/{digest}"


def validate_namespace(namespace: str) -> str:
    """Namespaces keep apps apart in one table: no ``/`` (it separates key parts)."""
    if not namespace or len(namespace) > 200 or "/" in namespace or "#" in namespace:
        raise ValueError(
            f"namespace must be 1-200 characters without '/' or '#', got {namespace!r}"
        )
    return namespace
