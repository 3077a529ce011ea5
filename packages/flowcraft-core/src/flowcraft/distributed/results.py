"""Waking ``wait_for_result`` when a run's result is published, instead of polling.

An adapter whose backend can notify (PostgreSQL ``LISTEN``, Redis ``SUBSCRIBE``, ...)
keeps one listening connection for all its waiters: :class:`ResultWaiters` is that
connection's list of who waits for which run, and ``watch_result`` (a hook of
``BaseDistributedAdapter``) hands each waiter a :class:`ResultWatch`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["FinalResult", "ResultStore", "ResultWaiters", "ResultWatch", "RunStatusInfo"]


@dataclass(slots=True)
class FinalResult:
    """What ``publish_final_result`` publishes and ``wait_for_result`` returns."""

    run_id: str
    status: str
    context: dict[str, Any]
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "status": self.status,
            "context": self.context,
            "errors": self.errors,
        }


@dataclass(slots=True)
class RunStatusInfo:
    run_id: str
    status: str  # running | awaiting | completed | failed | cancelled | unknown
    errors: list[dict[str, Any]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    # suspended activations, each {"nodeId", "kind" ("sleep" or "wait"), "until"
    # (epoch seconds or None), "event", "token"}: a durable sleep, a paused wait
    # for an event or with a timeout
    timers: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class ResultWatch:
    """``watch_result``'s handle: ``event`` is set when the run's result may have been
    published (a waiter then reads it); ``live()`` says whether notifications are
    arriving now (while they are, waiters poll less often)."""

    event: asyncio.Event
    live: Callable[[], bool] = lambda: True


class ResultWaiters:
    """The events of everyone waiting, per run id."""

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    def __len__(self) -> int:
        """How many runs someone waits for."""
        return len(self._events)

    def add(self, run_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events.setdefault(run_id, set()).add(event)
        return event

    def remove(self, run_id: str, event: asyncio.Event) -> None:
        events = self._events.get(run_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[run_id]

    def wake(self, run_id: str) -> None:
        """``run_id``'s result was published."""
        for event in self._events.get(run_id, ()):
            event.set()

    def wake_all(self) -> None:
        """Notifications may have been missed (the connection was down): all read again."""
        for events in self._events.values():
            for event in events:
                event.set()


class ResultStore(Protocol):
    """Where an adapter keeps final results (``RedisResults`` is one). An adapter that
    sets ``self.results`` to one gets ``read_final_result`` and ``watch_result`` from
    the base; its ``publish_final_result`` calls ``publish``."""

    async def publish(self, result: FinalResult) -> None:
        """Store the result if the run has none yet (the first publication wins)."""

    async def read(self, run_id: str) -> FinalResult | None: ...

    def watch(self, run_id: str) -> AbstractAsyncContextManager[ResultWatch]:
        """A watch whose event is set when ``run_id``'s result is published."""
        ...
