"""``AzureAdapter``: node jobs on Azure Storage Queues, run state in Cosmos DB, Redis
coordination.

The base classes own every decision (``BaseDistributedAdapter``: the protocol;
``PullingAdapter``: the receive/renew/settle loop). This module maps them to the
services' calls:

* ``receive``: one ``GET messages`` for up to the free slots (<= 32); the queue has
  no long polling, so an empty queue is polled again after a pause that doubles
  from ``poll_interval`` up to ``max_poll_interval`` (the bound on idle latency); a
  job this worker sends ends its pause at once.
* ``renew`` / ``release``: ``update_message`` with the message's newest pop receipt
  (a release is a visibility timeout of the delay); ``ack``: ``delete_message`` per
  message (the queue has no batch delete); ``dead_letter``: a copy with the reason
  on ``<queue>-poison``, then the delete.
* ``enqueue_job``: ``send_message`` of the job's JSON (ASCII, so always XML-safe);
  a fan-out's sends overlap (``concurrent_enqueues``), the queue has no batch send.
* ``create_context``: a :class:`~flowcraft_azure.context.CosmosContext`.
* ``publish_final_result``: ``create_item`` of the run's result item in Cosmos DB
  (409: the first result stays, and is what gets announced), then the core's
  ``RedisResults`` stores it first-wins in Redis and ``PUBLISH``es the run id, which
  wakes ``wait_for_result`` (one ``SUBSCRIBE`` per adapter). ``get_final_result``
  reads Redis, then the Cosmos DB item (the durable copy).

Consistency: the protocol reads what other workers committed (an activation record,
a predecessor's decision). Under Cosmos DB's default Session consistency a reader
without the writer's session token may be served by a replica that lacks the
commit, take the job for a duplicate and drop it. So the adapter requires the
account's default consistency to be Strong and checks it when it connects (a clear
error otherwise); ``require_strong_consistency=False`` is for single-replica
emulators only.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from azure.core.pipeline.transport import AioHttpTransport
from azure.cosmos import PartitionKey
from azure.cosmos.aio import CosmosClient
from azure.storage.queue.aio import QueueClient

from flowcraft.distributed.adapter import FinalResult
from flowcraft.distributed.delivery import DeadLetter
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft.distributed.redis import RedisCoordinationStore, RedisResults
from flowcraft.errors import FlowcraftError
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer
from flowcraft_azure._cosmos import PARTITION_KEY_PATH
from flowcraft_azure._operations import Operations
from flowcraft_azure._queue import MAX_RECEIVE, MAX_VISIBILITY_SECONDS, AzureMessage, StorageQueue
from flowcraft_azure.context import DEFAULT_MAX_STATE_BYTES, CosmosContext, CosmosRunStore

__all__ = ["AzureAdapter", "ConsistencyError"]

logger = logging.getLogger("flowcraft.azure")

POISON_SUFFIX = "-poison"


def _client_options(options: Mapping[str, Any] | None, trust_env: bool) -> dict[str, Any]:
    """A client's options; with ``trust_env=False`` and no transport given, a transport
    of its own that skips azure-core's per-request look-up of proxy settings and
    ``.netrc`` in the environment (a client closes its transport: never shared)."""
    made = dict(options or {})
    if not trust_env and "transport" not in made:
        made["transport"] = AioHttpTransport(use_env_settings=False)
    return made


class ConsistencyError(FlowcraftError):
    """The Cosmos DB account's default consistency is weaker than Strong."""


class AzureAdapter(Operations, PullingAdapter[AzureMessage]):
    """A flowcraft worker (and operator client) on Azure Storage Queues, Cosmos DB and Redis.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        queue_name: the job queue; dead letters go to ``<queue_name>-poison``.
        storage_connection_string: the storage account's connection string, or
        storage_account_url / storage_credential: its queue endpoint and credential
            (an account key, a SAS, an ``azure.identity`` async credential).
        storage_options: more ``QueueClient`` options (TLS: ``connection_verify``,
            ``connection_cert``; ``api_version``; retries ...).
        cosmos_url / cosmos_credential: the Cosmos DB account endpoint and key (or an
            async token credential); cosmos_client: a client to share instead (it is
            not closed by :meth:`close`).
        cosmos_options: more ``CosmosClient`` options (TLS: ``connection_verify``;
            ``enable_endpoint_discovery=False`` for an emulator; retry options ...).
        database / container: where run state lives (partition key ``/run``).
        require_strong_consistency: refuse an account whose default consistency is not
            Strong (see the module docstring). False only for a single-replica emulator.
        redis_url / redis_options: the coordination store (``RedisCoordinationStore``
            client options: TLS ``ssl_ca_certs``, ``password`` ...), or
            coordination_store: any ``CoordinationStore`` (not closed by :meth:`close`).
        poll_interval / max_poll_interval: the pause after an empty receive, doubling
            up to the maximum (the queue has no long polling).
        poll_window: how long one ``receive`` keeps polling an empty queue.
        max_state_bytes: bytes one run's state may hold (below the 2 MB item limit).
        max_deliveries: dead-letter a message the queue delivered more often than this
            (``dequeue_count``; hand-backs near it are re-sent, a fresh message).
        trust_env: read proxy settings and ``.netrc`` from the environment, as azure-core
            does by default, on every request (two thread hops each); False skips that
            (about a quarter of the worker's CPU per job, measured on the emulators).
        concurrency, visibility_seconds, ack_batch_size, ack_batch_window, event_bus,
            key_prefix, lease_seconds, ...: see ``PullingAdapter`` and
            ``BaseDistributedAdapter``.
    """

    concurrent_enqueues = True  # no batch send: a fan-out's sends overlap instead
    max_delay_seconds = float(MAX_VISIBILITY_SECONDS)  # a message's longest invisibility

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        queue_name: str = "flowcraft-jobs",
        storage_connection_string: str | None = None,
        storage_account_url: str | None = None,
        storage_credential: Any = None,
        storage_options: Mapping[str, Any] | None = None,
        cosmos_url: str | None = None,
        cosmos_credential: Any = None,
        cosmos_client: CosmosClient | None = None,
        cosmos_options: Mapping[str, Any] | None = None,
        database: str = "flowcraft",
        container: str = "runs",
        require_strong_consistency: bool = True,
        poll_interval: float = 0.05,
        max_poll_interval: float = 1.0,
        poll_window: float = 2.0,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        max_deliveries: int | None = 50,
        trust_env: bool = True,
        **options: Any,
    ) -> None:
        if (storage_connection_string is None) == (storage_account_url is None):
            raise ValueError(
                "pass exactly one of storage_connection_string= or storage_account_url="
            )
        if (cosmos_client is None) == (cosmos_url is None):
            raise ValueError("pass exactly one of cosmos_url= or cosmos_client=")
        if not 0 < poll_interval <= max_poll_interval:
            raise ValueError("need 0 < poll_interval <= max_poll_interval")
        super().__init__(
            runtime_options=runtime_options,
            max_deliveries=max_deliveries,
            **options,
        )
        self.queue_name = queue_name
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.poll_window = poll_window
        self.require_strong_consistency = require_strong_consistency

        def storage() -> dict[str, Any]:
            return _client_options(storage_options, trust_env)

        if storage_connection_string is not None:
            queue = QueueClient.from_connection_string(
                storage_connection_string, queue_name, **storage()
            )
            poison = QueueClient.from_connection_string(
                storage_connection_string, queue_name + POISON_SUFFIX, **storage()
            )
        else:
            assert storage_account_url is not None
            queue = QueueClient(
                storage_account_url, queue_name, credential=storage_credential, **storage()
            )
            poison = QueueClient(
                storage_account_url,
                queue_name + POISON_SUFFIX,
                credential=storage_credential,
                **storage(),
            )
        self.queue = StorageQueue(queue, poison)
        self._owns_cosmos = cosmos_client is None
        if cosmos_client is None:
            assert cosmos_url is not None
            cosmos_client = CosmosClient(
                cosmos_url,
                credential=cosmos_credential,
                **_client_options(cosmos_options, trust_env),
            )
        self.cosmos = cosmos_client
        self.database_name = database
        self.container_name = container
        self.runs = CosmosRunStore(
            self.cosmos.get_database_client(database).get_container_client(container),
            serializer=runtime_options.serializer or JsonSerializer(),
            max_state_bytes=max_state_bytes,
            ready=self.connect,
        )
        self._redis_results: RedisResults | None = None
        if isinstance(self.coordination_store, RedisCoordinationStore):
            self.results = self._redis_results = RedisResults(
                self.coordination_store.client,
                key_prefix=self.key_prefix,
                ttl_seconds=self.state_ttl_seconds,
            )
        self._connected: asyncio.Future[None] | None = None
        self._idle_pause = poll_interval
        self._nudge = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(queue={self.queue_name!r}, "
            f"container={self.database_name}/{self.container_name}, worker_id={self.worker_id!r})"
        )

    # ------------------------------------------------------------ connecting

    async def connect(self) -> None:
        """Open the Cosmos DB client and check the account's consistency (once; every
        store call awaits this first)."""
        if self._connected is None:
            self._connected = asyncio.ensure_future(self._connect())
        try:
            await asyncio.shield(self._connected)
        except BaseException:
            if self._connected.done():
                self._connected = None  # a failed connect is tried again next time
            raise

    async def _connect(self) -> None:
        if self._owns_cosmos:
            await self.cosmos.__aenter__()
        account = await self.cosmos._get_database_account()
        level = (account.ConsistencyPolicy or {}).get("defaultConsistencyLevel", "unknown")
        if self.require_strong_consistency and level != "Strong":
            raise ConsistencyError(
                f"the Cosmos DB account's default consistency is {level}; flowcraft-azure needs "
                "Strong (a worker reading a replica that lacks another worker's commit would "
                "drop that job). Set the account's default consistency to Strong, or pass "
                "require_strong_consistency=False for a single-replica emulator only."
            )
        logger.debug("Cosmos DB connected (consistency %s)", level)

    async def create_resources(self) -> None:
        """Create the queue, the poison queue, the database and the container if missing."""
        await self.connect()
        await self.queue.create()
        db = await self.cosmos.create_database_if_not_exists(self.database_name)
        await db.create_container_if_not_exists(
            self.container_name, partition_key=PartitionKey(PARTITION_KEY_PATH)
        )

    async def worker(self) -> None:
        """Connect (failing at once on a weaker consistency), then process jobs."""
        await self.connect()
        await super().worker()

    async def close(self) -> None:
        """Close the clients this adapter created (a given client or store stays open)."""
        if self._redis_results is not None:
            await self._redis_results.aclose()
        await self.queue.queue.close()
        await self.queue.poison.close()
        if self._owns_cosmos:
            await self.cosmos.close()

    # ------------------------------------------------------------ the seed's primitives

    def create_context(self, run_id: str) -> CosmosContext:
        return self.runs.context(run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.queue.send(json.dumps(job.to_wire(), separators=(",", ":"), ensure_ascii=True))
        # The queue cannot notify, but this worker knows a job is waiting: its own
        # receive stops backing off (other workers find it at their next poll).
        self._nudge.set()

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Create the result item (the first one stays), then announce the stored one."""
        if not await self.runs.write_result(run_id, result.to_json_dict()):
            # Published before (a finalizer redone, a racing duplicate): announce the
            # first result, never this one, so Redis and Cosmos DB agree.
            first = await self._read_item_result(run_id)
            result = first if first is not None else result
        if self.results is not None:
            await self.results.publish(result)

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        """The published result: Redis first (one ``GET``), else the Cosmos DB item (the
        durable copy, there even if Redis lost it). ``wait_for_result`` is woken by the
        base's watch on ``self.results`` (Redis ``SUBSCRIBE``)."""
        if self.results is not None:
            found = await self.results.read(run_id)
            if found is not None:
                return found
        return await self._read_item_result(run_id)

    async def _read_item_result(self, run_id: str) -> FinalResult | None:
        data = await self.runs.read_result(run_id)
        if data is None:
            return None
        return FinalResult(run_id, data["status"], data["context"], list(data.get("errors") or []))

    # ------------------------------------------------------------ the pull loop's calls

    async def receive(self, max_messages: int) -> Sequence[AzureMessage]:
        """Up to ``max_messages`` messages; on an empty queue, polls again after a
        growing pause for at most ``poll_window`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.poll_window
        while True:
            found = await self.queue.receive(
                min(max_messages, MAX_RECEIVE), self.visibility_seconds
            )
            if found:
                self._idle_pause = self.poll_interval
                return found
            pause = min(self._idle_pause, deadline - loop.time())
            if pause <= 0 or self.stopping:
                return []
            self._nudge.clear()
            try:
                async with asyncio.timeout(pause):
                    await self._nudge.wait()
            except TimeoutError:
                self._idle_pause = min(self._idle_pause * 2, self.max_poll_interval)
            else:  # this worker just sent a job: poll at once, and briskly again
                self._idle_pause = self.poll_interval

    def message_body(self, message: AzureMessage) -> str:
        return message.body

    def delivery_count(self, message: AzureMessage) -> int:
        return message.dequeue_count

    async def ack(self, messages: Sequence[AzureMessage]) -> None:
        """One delete per message (the queue has no batch delete), sent together."""
        await asyncio.gather(*(self.queue.remove(m) for m in messages))

    async def renew(self, message: AzureMessage, seconds: float) -> None:
        await self.queue.set_visibility(message, seconds)

    async def release(self, message: AzureMessage, delay_seconds: float) -> None:
        await self.queue.set_visibility(message, delay_seconds)

    async def resend(self, message: AzureMessage, delay_seconds: float) -> bool:
        """A fresh copy (dequeue count 0) hidden for the delay, then a delete: the
        queue counts hand-backs as dequeues, which ``max_deliveries`` reads."""
        await self.queue.send(message.body, delay_seconds=delay_seconds)
        await self.queue.remove(message)
        return True

    async def dead_letter(self, message: AzureMessage, reason: str) -> None:
        await self.queue.park(message, reason)

    # ------------------------------------------------------------ operators and tests

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """Running runs whose state item has not changed for ``older_than_seconds``: the
        base reconciler's candidates (one cross-partition query on ``st`` and ``_ts``)."""
        return await self.runs.stalled(older_than_seconds, limit)

    async def enqueue_raw(self, body: bytes) -> None:
        """Put ``body`` on the job queue unchecked (tools and tests). Queue messages are
        text: bytes that are not UTF-8 go as their Latin-1 reading."""
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text = body.decode("latin-1")
        await self.queue.send(text)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """A look at the poison queue (a peek: at most 32, nothing removed)."""
        return await self.queue.dead_letters(limit)
