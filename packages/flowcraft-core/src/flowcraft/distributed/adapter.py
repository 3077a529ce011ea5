"""``BaseDistributedAdapter``: all orchestration for running a workflow on a fleet.

Adapters implement the seed's primitives (context, consume, enqueue, publish); this
class owns everything else: commits, joins, loops, retries, failures, the final
status, events, every delivery's settlement, the worker's lifecycle and the operator
API. The protocol, and why a crash between any two steps is safe, is written down in
``DISTRIBUTED.md`` beside the package. The class is assembled from its parts, one
module each:

=====================  ===========================================================
``_core.py``           the state, the seed's contract and the hooks adapters override
``_resolution.py``     commit, follow-up, joins, loops, failures, the final status
``_handler.py``        a job's admission (reads, lease, heartbeat) and execution
``_operator.py``       start, status, results, resume, cancel, reconcile
``_worker.py``         the worker's lifecycle, the reconciler, settlement
=====================  ===========================================================
"""

from __future__ import annotations

from typing import Literal

from flowcraft.distributed._core import FINAL_STATUSES, JobHandler, RetryMode
from flowcraft.distributed._handler import JobHandling
from flowcraft.distributed._operator import OperatorAPI
from flowcraft.distributed._worker import WorkerLifecycle
from flowcraft.distributed.results import FinalResult, RunStatusInfo
from flowcraft.errors import (
    BlueprintError,
    PayloadDecodeError,
    RetryJob,
    RunConflictError,
    StateLimitError,
    UnknownBlueprintError,
    UnknownNodeError,
    VersionMismatchError,
)

__all__ = [
    "FINAL_STATUSES",
    "BaseDistributedAdapter",
    "FinalResult",
    "JobHandler",
    "RetryJob",
    "RetryMode",
    "RunConflictError",
    "RunStatusInfo",
    "job_disposition",
]

Disposition = Literal["ack", "retry", "dead-letter"]


class BaseDistributedAdapter(OperatorAPI, JobHandling, WorkerLifecycle):
    """Subclass and implement ``create_context``, ``process_jobs``, ``enqueue_job``
    and ``publish_final_result``; override the hooks to use queue-native retries."""


def job_disposition(exc: BaseException | None) -> Disposition:
    """What a queue should do with a job whose handler ended with ``exc``.

    ``retry`` also covers a version this worker lacks (hand it back for a
    compatible worker) and infrastructure errors (store unreachable).
    """
    if exc is None:
        return "ack"
    if isinstance(exc, RetryJob | VersionMismatchError):
        return "retry"
    if isinstance(
        exc,
        PayloadDecodeError
        | UnknownBlueprintError
        | UnknownNodeError
        | BlueprintError
        | StateLimitError,
    ):
        return "dead-letter"
    return "retry"
