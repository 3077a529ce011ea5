"""Final results kept in Redis, and waiters woken when one is published.

For adapters that coordinate through Redis (bullmq, and gcp, azure and kafka whose
queues cannot notify a waiter): ``publish`` stores the result with ``SET NX`` (the
first publication wins) and ``PUBLISH``es the run id in the same round trip. Each
adapter keeps one ``SUBSCRIBE`` connection, opened by its first waiter, and wakes
that run's waiters. Redis pub/sub reaches only connections subscribed at the time,
so a waiter reads the result once the subscription is confirmed (a result
published before is found then) and keeps polling slowly in case a message is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from flowcraft.distributed import keys as K
from flowcraft.distributed.results import ResultWaiters, ResultWatch
from flowcraft.errors import SerializationError

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub

    from flowcraft.distributed.adapter import FinalResult

__all__ = ["RedisResults"]

logger = logging.getLogger("flowcraft.distributed.redis")

_RESUBSCRIBE_SECONDS = 1.0
_CONFIRM_SECONDS = 5.0
_CLOSE_SECONDS = 2.0


class RedisResults:
    """Runs' final results in Redis: stored first-wins, published, watched.

    Args:
        client: the ``redis.asyncio.Redis`` to use (it stays open after :meth:`aclose`).
        key_prefix: prefix of the result keys and of the channel.
        ttl_seconds: how long a published result is kept.
    """

    def __init__(
        self, client: Redis, *, key_prefix: str = "flowcraft:", ttl_seconds: float = 7 * 24 * 3600
    ) -> None:
        self._client = client
        self.key_prefix = key_prefix
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.channel = K.results_channel(key_prefix)
        self.waiters = ResultWaiters()
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @property
    def listening(self) -> bool:
        """Whether the subscription is up (notifications arrive)."""
        return self._subscribed.is_set()

    def key(self, run_id: str) -> str:
        return K.result(self.key_prefix, run_id)

    async def publish(self, result: FinalResult) -> None:
        """``SET NX`` of the result (a repeat changes nothing), then ``PUBLISH`` of the
        run id, pipelined in one round trip."""
        record = {**result.to_json_dict(), "publishedAt": time.time()}
        try:
            text = json.dumps(record, ensure_ascii=False, allow_nan=False)
            text.encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"run {result.run_id!r}: result is not JSON: {exc}") from exc
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self.key(result.run_id), text, nx=True, px=self.ttl_ms)
            pipe.publish(self.channel, result.run_id)
            await pipe.execute()

    async def read(self, run_id: str) -> FinalResult | None:
        """The published result, or None."""
        from flowcraft.distributed.adapter import FinalResult

        raw: bytes | str | None = await self._client.get(self.key(run_id))
        if raw is None:
            return None
        data = json.loads(raw)
        return FinalResult(run_id, data["status"], data["context"], data.get("errors", []))

    @contextlib.asynccontextmanager
    async def watch(self, run_id: str) -> AsyncIterator[ResultWatch]:
        """A watch whose event is set when ``run_id``'s result is published (what the
        base adapter's ``watch_result`` hook yields)."""
        event = self.waiters.add(run_id)
        try:
            if self._task is None or self._task.done():
                self._task = asyncio.ensure_future(self._listen())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONFIRM_SECONDS):
                    await self._subscribed.wait()
            yield ResultWatch(event, self._subscribed.is_set)
        finally:
            self.waiters.remove(run_id, event)

    async def aclose(self) -> None:
        """Stop listening (the client stays open)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> None:
        while True:
            pubsub: PubSub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
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
