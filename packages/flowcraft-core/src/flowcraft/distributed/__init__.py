"""Running flowcraft across a fleet of workers: what adapters are built from.

An adapter subclasses :class:`BaseDistributedAdapter` (or, on a queue that is
polled, :class:`PullingAdapter`), gives it a context store (a
:class:`~flowcraft.context.BaseAsyncContext` per run) and a
:class:`CoordinationStore`, and maps each :class:`Settlement` to its queue's
calls. ``WRITING-AN-ADAPTER.md`` beside the package walks through one.

``RedisCoordinationStore`` needs the ``[redis]`` extra only when instantiated.
"""

from __future__ import annotations

from flowcraft.distributed._handler import Admission
from flowcraft.distributed._runstore import RunStore, RunStoreContext
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
    RunStatusInfo,
)
from flowcraft.distributed.coordination import (
    CoordinationStore,
    ICoordinationStore,
    InMemoryCoordinationStore,
)
from flowcraft.distributed.delivery import DeadLetter, Settlement, backoff_seconds
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft.distributed.redis import RedisCoordinationStore
from flowcraft.distributed.results import ResultWaiters, ResultWatch
from flowcraft.errors import RetryJob

__all__ = [
    "Admission",
    "BaseDistributedAdapter",
    "CoordinationStore",
    "DeadLetter",
    "FinalResult",
    "ICoordinationStore",
    "InMemoryCoordinationStore",
    "JobHandler",
    "JobPayload",
    "PullingAdapter",
    "RedisCoordinationStore",
    "ResultWaiters",
    "ResultWatch",
    "RetryJob",
    "RunStatusInfo",
    "RunStore",
    "RunStoreContext",
    "Settlement",
    "backoff_seconds",
]
