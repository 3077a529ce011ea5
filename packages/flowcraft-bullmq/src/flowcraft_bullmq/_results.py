"""Waking ``wait_for_result`` when a run's result is published.

``publish_final_result`` stores the result and then ``PUBLISH``es the run id on one
channel per key prefix. Each adapter that waits keeps one ``SUBSCRIBE`` connection,
opened by the first waiter, and sets the events of that run's waiters. Redis
pub/sub delivers only to connections subscribed at the time, so a waiter reads the
result once after the subscription is confirmed (a result published before is
found then), and keeps polling slowly in case a message is lost (a reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from flowcraft.distributed.results import ResultWaiters

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

__all__ = ["ResultListener"]

logger = logging.getLogger("flowcraft_bullmq")

_RESUBSCRIBE_SECONDS = 1.0
_CONFIRM_SECONDS = 5.0
_CLOSE_SECONDS = 2.0


class ResultListener:
    """One subscription to the results channel, shared by every waiter of an adapter."""

    def __init__(self, client: Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self.waiters = ResultWaiters()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def listening(self) -> bool:
        return self._subscribed.is_set()

    async def watch(self, run_id: str) -> asyncio.Event:
        """An event set when ``run_id``'s result is published. Returns once the
        subscription is confirmed (or after a few seconds without: then waiters poll)."""
        event = self.waiters.add(run_id)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._listen())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CONFIRM_SECONDS):
                await self._subscribed.wait()
        return event

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        while True:
            pubsub: PubSub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                async for message in pubsub.listen():
                    self._dispatch(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.info("results subscription lost (%r); waiters poll meanwhile", exc)
            finally:
                self._subscribed.clear()
                await _close(pubsub)
            await asyncio.sleep(_RESUBSCRIBE_SECONDS)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            self._subscribed.set()
            # Results published while not subscribed reached nobody: every waiter
            # reads again (the first time, a waiter reads anyway).
            self.waiters.wake_all()
        elif kind == "message":
            data = message.get("data")
            self.waiters.wake(data.decode("utf-8") if isinstance(data, bytes) else str(data))


async def _close(pubsub: PubSub) -> None:
    """Close the subscription's connection and wait until its socket is closed (redis-py's
    ``aclose`` does not wait, and a loop closed right after would find it open). Its
    reader, this listener, has stopped, so the wait cannot deadlock; it is bounded."""
    with contextlib.suppress(Exception):
        connection: Any = pubsub.connection
        if connection is not None:
            async with asyncio.timeout(_CLOSE_SECONDS):
                await connection.disconnect()
        await pubsub.aclose()  # type: ignore[no-untyped-call]
