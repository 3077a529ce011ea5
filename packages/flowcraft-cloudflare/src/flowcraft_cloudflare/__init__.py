"""flowcraft on Cloudflare: node jobs on Cloudflare Queues, run state and coordination in
Durable Objects, reached through a companion Worker shipped in this package."""

from flowcraft_cloudflare._client import (
    WorkerAuthError,
    WorkerClient,
    WorkerError,
    WorkerSettings,
    worker_dir,
)
from flowcraft_cloudflare.adapter import CloudflareAdapter
from flowcraft_cloudflare.context import MAX_VALUE_BYTES, DurableObjectContext, run_object
from flowcraft_cloudflare.coordination import DurableObjectCoordinationStore
from flowcraft_cloudflare.inbox import (
    MAX_DELAY_SECONDS,
    MAX_MESSAGE_BYTES,
    DeadLetter,
    Inbox,
    InboxMessage,
    InboxStats,
)
from flowcraft_cloudflare.pull_consumer import PullConsumer, QueuesApiError, QueuesApiSettings

__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_MESSAGE_BYTES",
    "MAX_VALUE_BYTES",
    "CloudflareAdapter",
    "DeadLetter",
    "DurableObjectContext",
    "DurableObjectCoordinationStore",
    "Inbox",
    "InboxMessage",
    "InboxStats",
    "PullConsumer",
    "QueuesApiError",
    "QueuesApiSettings",
    "WorkerAuthError",
    "WorkerClient",
    "WorkerError",
    "WorkerSettings",
    "run_object",
    "worker_dir",
]
