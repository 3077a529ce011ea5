"""``GcpAdapter``: node jobs on Pub/Sub, run state in Firestore, coordination in Redis.

The base classes own the protocol and the worker loop
(:class:`~flowcraft.distributed.PullingAdapter`: a pull per free slot, renewals while
a job runs, batched acks, settlement). This module maps them to Google's calls:

==========================  ====================================================
``create_context``          :class:`~flowcraft_gcp.FirestoreContext` (a document)
``enqueue_job(s)``          one Pub/Sub ``Publish`` (a fan-out in one call)
``receive``                 one unary ``Pull`` of at most the free slots
``renew``                   ``ModifyAckDeadline(ack_deadline_seconds)``
``release``                 ``ModifyAckDeadline(delay)`` (near the subscription's
                            delivery limit: published again, then acked)
``ack``                     one ``Acknowledge`` per batch
``dead_letter``             ``Publish`` to the dead-letter topic with the reason, ack
``publish_final_result``    the core's ``RedisResults``: ``SET NX`` + ``PUBLISH``
``results``                 the base reads it there; one shared Redis ``SUBSCRIBE``
                            wakes ``wait_for_result``
==========================  ====================================================

Coordination (leases, joins, the final claim) is the core's
``RedisCoordinationStore``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from google.pubsub_v1.types import ReceivedMessage

from flowcraft.distributed.adapter import FinalResult
from flowcraft.distributed.delivery import DeadLetter
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft.distributed.redis import RedisCoordinationStore, RedisResults
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer
from flowcraft_gcp._clients import GcpClients
from flowcraft_gcp._operations import Operations
from flowcraft_gcp.context import DEFAULT_MAX_STATE_BYTES, FirestoreContext, RunCollection
from flowcraft_gcp.queue import MAX_ACK_DEADLINE_SECONDS, JobQueue, QueueNames

if TYPE_CHECKING:
    from google.auth.credentials import Credentials

__all__ = ["GcpAdapter"]


class GcpAdapter(Operations, PullingAdapter[ReceivedMessage]):
    """A flowcraft worker (and operator client) on Pub/Sub, Firestore and Redis.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        project: the Google Cloud project (default ``GOOGLE_CLOUD_PROJECT``); or
            ``clients``, shared :class:`GcpClients` (not closed by :meth:`aclose`).
        credentials: ``google.auth`` credentials (default: Application Default
            Credentials; none against the emulators).
        firestore_database: the Firestore database id (default ``(default)``).
        firestore_options / pubsub_options: ``client_options`` for Google's clients
            (``api_endpoint``, ``client_cert_source`` for mTLS, ...).
        redis_url: ``redis://`` or ``rediss://`` URL of the coordination Redis (or
            ``coordination_store``, a shared ``RedisCoordinationStore``).
        redis_options: options of the Redis client for ``redis_url`` (TLS:
            ``ssl_ca_certs``, ``ssl_certfile``, ...; ``password``; pool size).
        topic: the job topic; its subscriptions and dead-letter topic are named after
            it (see :class:`QueueNames`), or give ``queue_names``.
        collection: the Firestore collection of run documents.
        create_topology: create missing topics and subscriptions on first use
            (off where the service account may not administer Pub/Sub).
        ack_deadline_seconds: how long a pulled job stays with its worker unless
            renewed (renewed every third of it while the job runs; 10-600).
        max_delivery_attempts: the subscription's dead-letter limit (5-100): a job
            delivered this often without being settled (it kills its worker) is
            parked by Pub/Sub.
        pull_timeout_seconds: how long a pull waits when no job is ready.
        max_state_bytes: what one run's context may hold (under Firestore's 1 MiB).
        concurrency: jobs in hand at once.
        event_bus, key_prefix, state_ttl_seconds, lease_seconds, dedupe_window_seconds,
            worker_id, retry_delay_seconds, ...: see the base adapters.
    """

    concurrent_enqueues = True
    max_delay_seconds = float(MAX_ACK_DEADLINE_SECONDS)  # release is ModifyAckDeadline

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        project: str | None = None,
        clients: GcpClients | None = None,
        credentials: Credentials | None = None,
        firestore_database: str | None = None,
        firestore_options: Mapping[str, Any] | None = None,
        pubsub_options: Mapping[str, Any] | None = None,
        topic: str = "flowcraft-jobs",
        queue_names: QueueNames | None = None,
        collection: str = "flowcraft_runs",
        create_topology: bool = True,
        ack_deadline_seconds: int = 30,
        max_delivery_attempts: int = 100,
        pull_timeout_seconds: float = 2.0,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        concurrency: int = 10,
        **options: Any,
    ) -> None:
        if clients is not None and (project or credentials or firestore_options or pubsub_options):
            raise ValueError("pass clients= or the settings to create them, not both")
        super().__init__(
            runtime_options=runtime_options,
            concurrency=concurrency,
            visibility_seconds=float(ack_deadline_seconds),
            **options,
        )
        self._owns_clients = clients is None
        self.clients = clients or GcpClients(
            project,
            credentials=credentials,
            database=firestore_database,
            firestore_options=firestore_options,
            pubsub_options=pubsub_options,
        )
        self.runs = RunCollection(
            self.clients,
            collection,
            max_state_bytes=max_state_bytes,
            state_ttl_seconds=self.state_ttl_seconds,
            serializer=runtime_options.serializer or JsonSerializer(),
        )
        self.queue = JobQueue(
            self.clients,
            queue_names or QueueNames.for_topic(topic),
            ack_deadline_seconds=ack_deadline_seconds,
            max_delivery_attempts=max_delivery_attempts,
            pull_timeout_seconds=pull_timeout_seconds,
        )
        if not create_topology:
            self.queue.assume_created()
        store = self.coordination_store
        assert isinstance(store, RedisCoordinationStore)  # given as one, or made from redis_url
        self.redis = store.client
        """The Redis client of coordination and results (keys under ``key_prefix``)."""
        self._results = RedisResults(
            self.redis,
            key_prefix=self.key_prefix,
            ttl_seconds=self.state_ttl_seconds,
        )
        self.results = self._results  # the base reads and watches results through it

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.queue!r}, worker_id={self.worker_id!r})"

    # ------------------------------------------------------------ the seed's primitives

    def create_context(self, run_id: str) -> FirestoreContext:
        return self.runs.context(run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.queue.publish([job.encode()])

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """A fan-out's successors (or a run's start nodes) in one ``Publish``."""
        if jobs:
            await self.queue.publish([job.encode() for job in jobs])

    async def enqueue_raw(self, body: bytes) -> None:
        """Put ``body`` on the job topic as it is (tools, tests)."""
        await self.queue.publish([body])

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Stored first-wins in Redis and announced there: the core's ``RedisResults``."""
        await self._results.publish(result)

    # ------------------------------------------------------------ the queue's calls

    async def receive(self, max_messages: int) -> Sequence[ReceivedMessage]:
        return await self.queue.pull(max_messages)

    def message_body(self, message: ReceivedMessage) -> bytes:
        return bytes(message.message.data)

    def delivery_count(self, message: ReceivedMessage) -> int | None:
        """Pub/Sub's ``delivery_attempt`` (numbered because the subscription has a
        dead-letter policy)."""
        return message.delivery_attempt or None

    async def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        await self.queue.ack(messages)

    async def renew(self, message: ReceivedMessage, seconds: float) -> None:
        await self.queue.modify([message], seconds)

    async def release(self, message: ReceivedMessage, delay_seconds: float) -> None:
        """``ModifyAckDeadline(delay)`` (at most 600 s)."""
        await self.queue.modify([message], delay_seconds)

    async def redelivery_limit(self) -> int:
        return self.queue.max_delivery_attempts

    async def resend(self, message: ReceivedMessage, delay_seconds: float) -> bool:
        """Publish the job again (at once: Pub/Sub cannot delay one message) and ack
        this copy."""
        await self.queue.publish([bytes(message.message.data)], dict(message.message.attributes))
        await self.queue.ack([message])
        return True

    async def dead_letter(self, message: ReceivedMessage, reason: str) -> None:
        await self.queue.dead_letter(message, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The parked jobs with their reasons (they stay parked)."""
        return await self.queue.dead_letters(limit)

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """The reconciler's candidates: one Firestore query on the run documents' ``a``
        field (the last write of a run that has not ended)."""
        return await self.runs.stalled(older_than_seconds, limit)

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the result listener and what this adapter created (shared clients and
        a given coordination store stay open)."""
        await self._results.aclose()
        if self._owns_clients:
            await self.clients.aclose()
