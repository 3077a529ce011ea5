"""What becomes of a delivered job: decided once, here, for every queue.

The base adapter decodes a delivery, runs the handler and turns its outcome into
one :class:`Settlement`: ack it, release it for another delivery after a delay, or
dead-letter it with a reason. An adapter only maps a settlement to its queue's
calls (delete, visibility change, nack, a dead-letter queue); it never decides.
The backoff of a failed attempt is :func:`backoff_seconds`, the same function the
in-process executor waits by, so ``retry_delay``/``retry_backoff`` mean one thing
whether the worker or the queue retries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flowcraft.errors import (
    BlueprintError,
    NodeExecutionError,
    PayloadDecodeError,
    RetryJob,
    StateLimitError,
    TimerPending,
    UnknownBlueprintError,
    UnknownNodeError,
    VersionMismatchError,
)

if TYPE_CHECKING:
    from flowcraft.blueprint import NodeDefinition

__all__ = [
    "MAX_BACKOFF_FACTOR",
    "DeadLetter",
    "Settlement",
    "SettlementAction",
    "backoff_seconds",
    "describe",
    "settlement_for",
]

logger = logging.getLogger("flowcraft.distributed")

SettlementAction = Literal["ack", "release", "dead-letter"]

MAX_BACKOFF_FACTOR = 64
"""An exponential backoff stops growing at 64 times the node's ``retry_delay``."""

_BAD_INPUT = (
    PayloadDecodeError,
    UnknownBlueprintError,
    UnknownNodeError,
    BlueprintError,
    StateLimitError,
)


@dataclass(frozen=True, slots=True)
class Settlement:
    """The base adapter's decision about one delivery.

    ``release`` puts the job back for another delivery after ``delay_seconds``;
    ``failed_attempt`` says whether it used up one of the node's attempts (a
    queue-mode attempt that failed) or not (a busy lease, a version this worker
    lacks, a store that did not answer). ``dead-letter`` carries the ``reason``
    to keep beside the parked message."""

    action: SettlementAction
    delay_seconds: float = 0.0
    reason: str = ""
    failed_attempt: bool = False
    busy: bool = False
    """Released because the activation is running elsewhere (or waits for its timer):
    expected, so it never counts toward a limit on redeliveries."""
    timer: bool = False
    """Released until a timer is due (a durable sleep, a wait's timeout): the delay is
    the time left, to be honoured as closely as the queue can (never shortened to
    spin faster, never jittered)."""

    @classmethod
    def ack(cls) -> Settlement:
        return _ACK


_ACK = Settlement("ack")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked job as an adapter lists it: the raw body and why it was parked
    (``attributes``: what else the queue kept with it, such as headers)."""

    body: bytes | str
    reason: str
    id: str = ""
    attributes: Mapping[str, Any] = field(default_factory=dict)


def backoff_seconds(node: NodeDefinition | None, failed_attempt: int) -> float:
    """Seconds to wait after failed attempt ``failed_attempt`` (1 = the first) of
    ``node``: its ``retry_delay``, doubled per attempt when the backoff is
    exponential, never more than ``MAX_BACKOFF_FACTOR`` times it."""
    config = node.config if node is not None else None
    delay = (config.retry_delay if config else 0) / 1000
    if config is None or config.retry_backoff == "fixed":
        return delay
    return delay * min(2.0 ** max(0, failed_attempt - 1), MAX_BACKOFF_FACTOR)


def settlement_for(exc: BaseException | None, *, infrastructure_delay: float = 1.0) -> Settlement:
    """The settlement of a delivery whose handler ended with ``exc`` (None: returned).

    Bad input is dead-lettered at once (redelivering cannot help); a queue-mode
    attempt that failed is released after the node's backoff (its ``RetryJob`` says
    how long) and counts as an attempt; everything else (a busy lease, a version
    this worker lacks, an error of the stores) is released without counting:
    another delivery may succeed."""
    if exc is None:
        return _ACK
    if isinstance(exc, _BAD_INPUT):
        return Settlement("dead-letter", reason=describe(exc))
    if isinstance(exc, TimerPending):
        return Settlement(
            "release", delay_seconds=exc.delay_seconds, reason=describe(exc), busy=True, timer=True
        )
    if isinstance(exc, RetryJob):
        failed = isinstance(exc.__cause__, NodeExecutionError)
        return Settlement(
            "release",
            delay_seconds=exc.delay_seconds,
            reason=describe(exc),
            failed_attempt=failed,
            busy=not failed,
        )
    if isinstance(exc, VersionMismatchError):
        return Settlement("release", delay_seconds=infrastructure_delay, reason=describe(exc))
    return Settlement("release", delay_seconds=infrastructure_delay, reason=describe(exc))


def describe(exc: BaseException) -> str:
    """``Type: message``, as kept beside a dead letter or logged."""
    return f"{type(exc).__name__}: {exc}"
