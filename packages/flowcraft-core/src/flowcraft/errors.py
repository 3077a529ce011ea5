"""Every error flowcraft raises, in one hierarchy.

::

    FlowcraftError
    ├── BlueprintError          invalid blueprint (names the node or edge at fault)
    ├── ExpressionError         a condition/transform/input expression refused or failed
    ├── NodeExecutionError      a node failed after its last attempt
    │   └── NodeTimeoutError    a node attempt exceeded its timeout
    ├── UnknownNodeError        a node's ``uses`` has no implementation in the registry
    ├── UnknownBlueprintError   a blueprint id that no registry knows
    ├── CancelledRunError       the run was cancelled
    ├── SerializationError      a value cannot be encoded or decoded as JSON
    ├── PayloadDecodeError      untrusted job bytes are not a valid JobPayload
    ├── StateLimitError         the run's state exceeds what the context store can hold
    ├── VersionMismatchError    a job names a blueprint version this worker lacks
    ├── RunConflictError        an operator call conflicts with the run as it is
    └── RetryJob                deliver this job again later (a busy activation, a
                                failed queue-mode attempt)
"""

from __future__ import annotations

__all__ = [
    "BlueprintError",
    "CancelledRunError",
    "ExpressionError",
    "FlowcraftError",
    "NodeExecutionError",
    "NodeTimeoutError",
    "PayloadDecodeError",
    "RetryJob",
    "RunConflictError",
    "SerializationError",
    "StateLimitError",
    "UnknownBlueprintError",
    "UnknownNodeError",
    "VersionMismatchError",
]


class FlowcraftError(Exception):
    """Base class of every error flowcraft raises."""


class BlueprintError(FlowcraftError, ValueError):
    """A blueprint is invalid; the message names the node or edge at fault."""


class ExpressionError(FlowcraftError, ValueError):
    """An expression was refused (unsafe, too costly, unparsable) or failed to evaluate."""

    def __init__(self, message: str, *, expression: str | None = None) -> None:
        super().__init__(message)
        self.expression = expression


class NodeExecutionError(FlowcraftError):
    """A node failed after its last attempt."""

    def __init__(self, message: str, *, node_id: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.__cause__ = cause


class NodeTimeoutError(NodeExecutionError):
    """A node attempt ran longer than its ``timeout``."""


class UnknownNodeError(FlowcraftError, LookupError):
    """A node's ``uses`` names no implementation in the registry."""


class UnknownBlueprintError(FlowcraftError, LookupError):
    """A blueprint id that this runtime does not know."""


class CancelledRunError(FlowcraftError):
    """The run was cancelled."""


class SerializationError(FlowcraftError, ValueError):
    """A value cannot be encoded to, or decoded from, the wire format."""


class PayloadDecodeError(SerializationError):
    """Untrusted job bytes are not a valid ``JobPayload``."""


class StateLimitError(FlowcraftError):
    """The run's state would exceed what the context store can hold."""


class VersionMismatchError(FlowcraftError):
    """A job names a blueprint version this worker does not have."""


class RetryJob(FlowcraftError):
    """Deliver this job again later: its activation is busy elsewhere, or a queue-mode
    attempt failed (then ``__cause__`` is the ``NodeExecutionError``).
    ``delay_seconds`` is a hint for the queue."""

    def __init__(self, message: str, *, delay_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.delay_seconds = delay_seconds


class TimerPending(RetryJob):
    """Deliver this job again when its timer is due (a durable sleep, a wait's
    timeout): ``delay_seconds`` is the time left, capped at the longest delay the
    queue can give. A wake-up before the due time simply sleeps again."""


class RunConflictError(FlowcraftError, ValueError):
    """An operator call conflicts with the run as it is: a start with a run id already
    used by another request, or a resume that another call (or the run's end) beat."""
