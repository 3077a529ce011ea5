"""flowcraft on Google Cloud: Pub/Sub carries the jobs, Firestore holds run state,
Redis coordinates (the core's ``RedisCoordinationStore``) and keeps final results."""

from __future__ import annotations

from flowcraft_gcp._clients import GcpClients
from flowcraft_gcp.adapter import GcpAdapter
from flowcraft_gcp.context import (
    DEFAULT_MAX_STATE_BYTES,
    FIRESTORE_DOCUMENT_LIMIT,
    FirestoreContext,
    RunCollection,
)
from flowcraft_gcp.queue import JobQueue, QueueNames

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "FIRESTORE_DOCUMENT_LIMIT",
    "FirestoreContext",
    "GcpAdapter",
    "GcpClients",
    "JobQueue",
    "QueueNames",
    "RunCollection",
]
