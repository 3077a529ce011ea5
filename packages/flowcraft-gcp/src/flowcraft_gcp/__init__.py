"""flowcraft on Google Cloud: Pub/Sub carries the jobs, Firestore holds run state and
results, Redis coordinates (the core's ``RedisCoordinationStore``)."""

from __future__ import annotations

from flowcraft_gcp._clients import GcpClients
from flowcraft_gcp.context import (
    DEFAULT_MAX_STATE_BYTES,
    FIRESTORE_DOCUMENT_LIMIT,
    FirestoreContext,
    RunCollection,
)

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "FIRESTORE_DOCUMENT_LIMIT",
    "FirestoreContext",
    "GcpClients",
    "RunCollection",
]
