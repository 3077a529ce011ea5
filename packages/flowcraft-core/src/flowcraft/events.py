"""Events: one for every step, through a bus you supply."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["CollectingEventBus", "EventBus", "FlowEvent", "ignored_kinds", "wants"]

logger = logging.getLogger("flowcraft.events")


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """``type`` is one of: workflow:start, workflow:finish, workflow:stall,
    workflow:pause (awaiting or stalled), workflow:resume, node:start, node:finish,
    node:retry, node:error, node:fallback, node:skipped, node:awaiting (a wait paused:
    activation, and event, token, timeoutAt for an event wait), node:sleep (a durable
    sleep began: activation, until, durationMs), node:wake (it was due: activation,
    until), node:signal (a signal resumed a wait: activation, event, token, payload),
    node:timeout (a wait's timeout took its ``timeout`` edge: activation, event,
    token, timeoutAt),
    edge:evaluate (a condition and its outcome), context:change (a committed
    write), batch:start, batch:finish, job:enqueued, job:processed, job:failed,
    job:duplicate, job:requeued. The in-memory runtime emits the node, edge and
    context events; a distributed adapter emits its own subset. Events about one
    activation of a node carry ``data["activation"]`` (and ``attempt`` where there
    is one): run history tells loop iterations and repeats apart by them."""

    type: str
    run_id: str
    node_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EventBus(Protocol):
    """Takes every event. A bus may also have an ``ignored_kinds`` attribute (a
    collection of event types it does nothing with): emitters that check
    :func:`wants` then skip building those events."""

    def emit(self, event: FlowEvent) -> Awaitable[None] | None: ...


_NONE: frozenset[str] = frozenset()


def ignored_kinds(bus: EventBus | None) -> Collection[str]:
    """The event types ``bus`` says it ignores (none unless it says so)."""
    found = getattr(bus, "ignored_kinds", None)
    return found if found is not None else _NONE


def wants(bus: EventBus | None, kind: str) -> bool:
    """Whether an event of ``kind`` is worth building for ``bus``: there is a bus and
    it does not list the kind in its ``ignored_kinds``."""
    if bus is None:
        return False
    found = getattr(bus, "ignored_kinds", None)
    return found is None or kind not in found


class CollectingEventBus:
    """Keeps every event (for tests) and optionally forwards to a callback."""

    def __init__(self, callback: Callable[[FlowEvent], Any] | None = None) -> None:
        self.events: list[FlowEvent] = []
        self._callback = callback

    def emit(self, event: FlowEvent) -> None:
        self.events.append(event)
        if self._callback is not None:
            self._callback(event)

    def types(self, node_id: str | None = None) -> list[str]:
        return [e.type for e in self.events if node_id is None or e.node_id == node_id]


async def emit(bus: EventBus | None, event: FlowEvent) -> None:
    """Emit without letting a broken subscriber break the run."""
    if bus is None:
        return
    try:
        result = bus.emit(event)
        if result is not None and inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("event bus failed on %s", event.type)
