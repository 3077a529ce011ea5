"""Google's asyncio clients, created inside the running event loop.

grpc.aio channels belong to the loop that created them: a client made at import
time, or in another loop (a test's fixture, ``asyncio.run`` twice), fails with
"attached to a different loop". :class:`GcpClients` therefore creates the
Firestore and Pub/Sub clients on first use inside the running loop, and again if
the loop changed. Both honour the emulators' ``FIRESTORE_EMULATOR_HOST`` and
``PUBSUB_EMULATOR_HOST`` variables (plaintext, no credentials); otherwise they
use Application Default Credentials or the ``credentials`` given, over TLS, with
``client_options`` passed through (endpoint, mTLS certificate source, quota project).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.api_core import client_options as client_options_lib
from google.api_core.client_options import ClientOptions
from google.cloud.firestore_v1.async_client import AsyncClient as FirestoreAsyncClient
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

__all__ = ["GcpClients"]

logger = logging.getLogger("flowcraft.gcp")

_PROJECT_VARIABLES = ("GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT", "GCP_PROJECT")


def _default_project() -> str | None:
    for name in _PROJECT_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value
    return None


class _LoopClients:
    """The clients of one event loop, each created on first use (a worker that only
    talks to Pub/Sub never needs Firestore's credentials, and the reverse)."""

    def __init__(self, owner: GcpClients) -> None:
        self.loop = asyncio.get_running_loop()
        self._owner = owner
        self._firestore: FirestoreAsyncClient | None = None
        self._publisher: PublisherAsyncClient | None = None
        self._subscriber: SubscriberAsyncClient | None = None

    def _pubsub_options(self) -> ClientOptions | None:
        options = self._owner.pubsub_options
        return client_options_lib.from_dict(dict(options)) if options else None

    @property
    def firestore(self) -> FirestoreAsyncClient:
        if self._firestore is None:
            owner = self._owner
            self._firestore = FirestoreAsyncClient(
                project=owner.project,
                credentials=owner.credentials,
                database=owner.database,
                client_options=dict(owner.firestore_options) if owner.firestore_options else None,
            )
        return self._firestore

    @property
    def publisher(self) -> PublisherAsyncClient:
        if self._publisher is None:
            self._publisher = PublisherAsyncClient(
                credentials=self._owner.credentials, client_options=self._pubsub_options()
            )
        return self._publisher

    @property
    def subscriber(self) -> SubscriberAsyncClient:
        if self._subscriber is None:
            self._subscriber = SubscriberAsyncClient(
                credentials=self._owner.credentials, client_options=self._pubsub_options()
            )
        return self._subscriber

    async def close(self) -> None:
        transports = [
            self._publisher.transport if self._publisher is not None else None,
            self._subscriber.transport if self._subscriber is not None else None,
            # The Firestore client has no close(); its GAPIC client's transport does.
            getattr(getattr(self._firestore, "_firestore_api", None), "transport", None),
        ]
        for transport in transports:
            if transport is not None:
                with contextlib.suppress(Exception):
                    await transport.close()


class GcpClients:
    """Firestore and Pub/Sub clients for one project, shared by contexts and adapters.

    Args:
        project: the Google Cloud project; default ``GOOGLE_CLOUD_PROJECT`` (or
            ``GCLOUD_PROJECT``).
        credentials: ``google.auth`` credentials for both services; default
            Application Default Credentials (none against the emulators).
        database: the Firestore database id (default ``(default)``).
        firestore_options / pubsub_options: ``client_options`` for each client
            (``api_endpoint``, ``client_cert_source`` for mTLS, ``quota_project_id``).

    ``requests`` counts the calls made, per ``service.method``, for benchmarks.
    Nothing here logs credentials.
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        credentials: Credentials | None = None,
        database: str | None = None,
        firestore_options: Mapping[str, Any] | None = None,
        pubsub_options: Mapping[str, Any] | None = None,
    ) -> None:
        resolved = project or _default_project()
        if not resolved:
            raise ValueError("no Google Cloud project: pass project= or set GOOGLE_CLOUD_PROJECT")
        self.project: str = resolved
        self.credentials = credentials
        self.database = database
        self.firestore_options = firestore_options
        self.pubsub_options = pubsub_options
        self.requests: Counter[str] = Counter()
        self._current: _LoopClients | None = None
        self._stale: list[_LoopClients] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(project={self.project!r})"

    def _clients(self) -> _LoopClients:
        current = self._current
        loop = asyncio.get_running_loop()
        if current is None or current.loop is not loop:
            if current is not None:
                # Its loop is gone or another one: its channels cannot be used here.
                self._stale.append(current)
            current = self._current = _LoopClients(self)
        return current

    def firestore(self) -> FirestoreAsyncClient:
        """The Firestore client of the running loop."""
        return self._clients().firestore

    def publisher(self) -> PublisherAsyncClient:
        """The Pub/Sub publisher client of the running loop."""
        return self._clients().publisher

    def subscriber(self) -> SubscriberAsyncClient:
        """The Pub/Sub subscriber client of the running loop."""
        return self._clients().subscriber

    def count(self, call: str, n: int = 1) -> None:
        self.requests[call] += n

    async def aclose(self) -> None:
        """Close the clients of the running loop (others died with their loops)."""
        current, self._current = self._current, None
        self._stale.clear()
        if current is not None and current.loop is asyncio.get_running_loop():
            await current.close()
