"""RabbitMQ for the adapter: the topology, confirmed publishing, consuming, dead letters.

Only stock RabbitMQ features (no plugins):

* a durable work queue whose rejected messages dead-letter to a fanout
  exchange ``<queue>.dlx`` bound to the durable queue ``<queue>.dead``;
* every queue a classic queue of storage version 2 (RabbitMQ 3.10+, the default from
  3.12; older servers ignore the argument);
* delayed redelivery: a durable delay queue per delay bucket, without consumers,
  whose messages carry a per-message TTL (``expiration``) and dead-letter back
  to the work queue through the default exchange when it runs out;
* persistent messages published on a channel with publisher confirms, as
  ``mandatory`` (an unroutable message is an error, not a silent drop);
* one connection (``_amqp``), opened again on first use after it was lost: a publish
  retries through a broker restart, and the consumer starts again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from ssl import SSLContext
from typing import Any

from pamqp import commands as amqp

from flowcraft.distributed import DeadLetter
from flowcraft_rabbitmq._amqp import (
    ERRORS,
    RETRYABLE,
    Channel,
    ChannelClosed,
    Connection,
    Message,
    Parameters,
    Unroutable,
    connect,
)
from flowcraft_rabbitmq._settings import DELAY_BUCKETS_MS, HEADER_ERROR, Topology

__all__ = ["Broker", "Delivery"]

logger = logging.getLogger("flowcraft.rabbitmq.broker")

Delivery = Message
"""A message delivered to the worker: ``body``, ``headers``, ``ack``/``nack``/``reject``."""

Callback = Callable[[Delivery], Coroutine[Any, Any, None]]

_NOT_FOUND = 404
_PRECONDITION_FAILED = 406

CLASSIC_V2: dict[str, Any] = {"x-queue-version": 2}
"""Every queue's storage: a version-1 classic queue (3.10 and 3.11's default) cost
RabbitMQ about a third more CPU per persistent message (0.25 against 0.19 ms per
chain job in bench_rabbitmq) and the chain about 20 % of its node jobs/s."""


def _header_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _death_reason(headers: Mapping[str, Any]) -> str:
    """The reason of the latest ``x-death`` entry RabbitMQ added (``rejected``, ...)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return _header_text(deaths[0].get("reason")) or "unknown"
    return "unknown"


class Broker:
    """The adapter's RabbitMQ objects in one namespace (see :class:`Topology`).

    Args:
        topology: queue and exchange names.
        url: an ``amqp://`` or ``amqps://`` URL.
        ssl_context: TLS for the connection (``amqps://`` without one uses the system's
            default context).
        reconnect_interval: seconds between reconnection attempts of the consumer.
        publish_timeout: how long a publish keeps trying (through a reconnect)
            before it raises.
        connect_kwargs: ``heartbeat`` (seconds, default 60), ``connect_timeout``
            (seconds, default 10), ``client_properties``.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        url: str,
        ssl_context: SSLContext | None = None,
        reconnect_interval: float = 1.0,
        publish_timeout: float = 60.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.topology = topology
        self._parameters = Parameters.from_url(url, **dict(connect_kwargs or {}))
        self._ssl_context = ssl_context
        self.reconnect_interval = reconnect_interval
        self.publish_timeout = publish_timeout
        self._connection: Connection | None = None
        self._channel: Channel | None = None
        self._declared: set[str] = set()
        self._version_1: set[str] = set()
        """Queues an earlier release declared without ``x-queue-version`` (kept so)."""
        self._connecting = asyncio.Lock()
        self._opening = asyncio.Lock()
        self.round_trips: Counter[str] = Counter()
        """Confirmed publishes and declarations (one round trip each) and acks (one frame)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.topology.queue!r})"  # never the URL

    # ------------------------------------------------------------------ connection

    async def connection(self) -> Connection:
        """The connection, opened again if it was lost."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        async with self._connecting:
            connection = self._connection
            if connection is None or not connection.is_open:
                lost = connection is not None
                connection = await connect(self._parameters, self._ssl_context)
                self._connection = connection
                self._channel = None
                self._declared.clear()
                if lost:
                    logger.info("connected to RabbitMQ again")
        return connection

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[Channel]:
        """A channel of its own, closed afterwards (its unacked messages go back)."""
        channel = await (await self.connection()).channel()
        try:
            yield channel
        finally:
            await channel.close()

    async def declare(self) -> None:
        """Connect and declare the work queue and the dead-letter exchange and queue."""
        await self._publisher()

    async def _publisher(self) -> Channel:
        """The confirm channel every publish goes through; declares the work queue."""
        channel = self._channel
        if channel is not None and channel.is_open:
            return channel
        async with self._opening:
            channel = self._channel
            if channel is None or not channel.is_open:
                await self._declare_work_queue()
                channel = await (await self.connection()).channel(confirms=True)
                self._channel = channel
        return channel

    async def _declare_work_queue(self) -> None:
        names = self.topology
        async with _Declaring(self) as declaring:
            await declaring.call(
                amqp.Exchange.Declare(
                    exchange=names.dead_exchange, exchange_type="fanout", durable=True
                )
            )
            await declaring.queue(names.dead_queue, {})
            await declaring.call(
                amqp.Queue.Bind(
                    queue=names.dead_queue, exchange=names.dead_exchange, routing_key=""
                )
            )
            await declaring.queue(names.queue, {"x-dead-letter-exchange": names.dead_exchange})

    async def _ensure_delay_queue(self, bucket_ms: int) -> str:
        name = self.topology.delay_queue(bucket_ms)
        if name not in self._declared:
            async with _Declaring(self) as declaring:
                await declaring.queue(
                    name,
                    {
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": self.topology.queue,
                    },
                )
            self._declared.add(name)
        return name

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        delay_ms: int = 0,
        dead: bool = False,
    ) -> None:
        """Publish persistently and wait for the broker's confirm: to the work queue,
        to the delay queue of bucket ``delay_ms`` (> 0), or to the dead-letter exchange.

        Connection errors (a broker restart) are retried until ``publish_timeout``;
        a publish whose confirm was lost may therefore arrive twice, which the
        protocol tolerates (every job is idempotent).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        pause = 0.1
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._publish_once(body, headers, delay_ms, dead)
                return
            except (Unroutable, ChannelClosed) as exc:
                # A queue or the exchange was deleted behind our back: declare them again.
                if isinstance(exc, ChannelClosed) and exc.code != _NOT_FOUND:
                    raise
                if loop.time() >= deadline:
                    raise
                logger.info("publish failed (%s); declaring the queues again", exc)
                self._declared.clear()
                with contextlib.suppress(*ERRORS):
                    await self._declare_work_queue()
            except RETRYABLE as exc:
                if loop.time() >= deadline:
                    raise
                logger.info("publish failed (%r); retrying in %.1f s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _publish_once(
        self, body: bytes, headers: Mapping[str, Any] | None, delay_ms: int, dead: bool
    ) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            channel = await self._publisher()
        if dead:
            exchange, routing_key = self.topology.dead_exchange, ""
        elif delay_ms > 0:
            exchange, routing_key = "", await self._ensure_delay_queue(delay_ms)
        else:
            exchange, routing_key = "", self.topology.queue
        properties = None  # a job: the channel packs its header itself
        if headers or delay_ms > 0:
            properties = amqp.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                headers=dict(headers) if headers else None,
                expiration=str(delay_ms) if delay_ms > 0 else None,
            )
        self.round_trips["publish"] += 1
        confirm = channel.publish(
            body, exchange=exchange, routing_key=routing_key, properties=properties
        )
        assert confirm is not None  # a confirm channel
        await confirm

    # ------------------------------------------------------------------ consuming

    async def consume(self, callback: Callback, prefetch: int) -> _Consumer:
        """Start delivering the work queue to ``callback``, ``prefetch`` unacked at most;
        after a lost connection or a deleted queue the consumer starts again by itself."""
        await self._publisher()  # the topology exists before we consume
        consumer = _Consumer(self, callback, prefetch)
        await consumer.start()
        return consumer

    # ------------------------------------------------------------------ operating

    async def dead_letters(self, limit: int = 100, *, remove: bool = False) -> list[DeadLetter]:
        """Up to ``limit`` dead-lettered messages; ``remove`` acks (deletes) them,
        otherwise they stay queued (read on a channel that is closed unacked)."""
        await self._publisher()
        found: list[DeadLetter] = []
        async with self.channel() as channel:
            while len(found) < limit:
                message = await channel.get(self.topology.dead_queue)
                if message is None:
                    break
                headers = dict(message.headers)
                error = _header_text(headers.get(HEADER_ERROR))
                if not error:
                    error = f"dead-lettered by RabbitMQ ({_death_reason(headers)})"
                found.append(DeadLetter(message.body, error, attributes=headers))
                if remove:
                    await message.ack()
        return found

    async def depths(self) -> dict[str, int]:
        """Messages ready in the work queue, the dead-letter queue and each delay queue."""
        await self._publisher()
        for bucket in DELAY_BUCKETS_MS:
            await self._ensure_delay_queue(bucket)
        depths: dict[str, int] = {}
        async with self.channel() as channel:
            names = self.topology
            for name in [names.queue, names.dead_queue, *names.delay_queues()]:
                ok = await channel.call(amqp.Queue.Declare(queue=name, passive=True))
                depths[name] = int(ok.message_count or 0)
        return depths

    async def delete_topology(self) -> None:
        """Delete every queue and the exchange of this namespace (tests, teardown)."""
        async with self.channel() as channel:
            names = self.topology
            for name in [names.queue, names.dead_queue, *names.delay_queues()]:
                await channel.call(amqp.Queue.Delete(queue=name))
            await channel.call(amqp.Exchange.Delete(exchange=names.dead_exchange))
        self._declared.clear()
        publisher, self._channel = self._channel, None
        if publisher is not None:
            await publisher.close()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = None
        if connection is not None:
            await connection.close()


class _Declaring:
    """Declarations on a channel of their own. A queue is declared as a version-2
    classic queue, unless an earlier release declared it without the version: RabbitMQ
    refuses the version-2 declaration as inequivalent (406, closing the channel), and
    the queue is then declared as it was, on a new channel, with a warning. Its jobs
    stay where they are; deleting it once drained gets version 2."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._channel: Channel | None = None

    async def __aenter__(self) -> _Declaring:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def call(self, method: Any) -> Any:
        channel = self._channel
        if channel is None or not channel.is_open:
            channel = self._channel = await (await self.broker.connection()).channel()
        self.broker.round_trips["declare"] += 1
        return await channel.call(method)

    async def queue(self, name: str, arguments: dict[str, Any]) -> None:
        version_1 = self.broker._version_1
        if name not in version_1:
            try:
                await self.call(
                    amqp.Queue.Declare(
                        queue=name, durable=True, arguments={**arguments, **CLASSIC_V2}
                    )
                )
                return
            except ChannelClosed as exc:
                if exc.code != _PRECONDITION_FAILED or "x-queue-version" not in exc.text:
                    raise
        await self.call(amqp.Queue.Declare(queue=name, durable=True, arguments=arguments))
        if name not in version_1:
            version_1.add(name)
            logger.warning(
                "queue %r was declared by an earlier flowcraft-rabbitmq as a version-1 "
                "classic queue; it is used as it is (RabbitMQ spends about a third more "
                "CPU per message on it): delete it once drained to have it declared as "
                "version 2",
                name,
            )


class _Consumer:
    """The work queue's consumer on a channel of its own, started again (QoS, the
    queue's declaration, the consume) whenever its channel is lost or the server
    cancels it, every ``reconnect_interval`` until it succeeds. cancel stops
    deliveries; close ends the channel."""

    def __init__(self, broker: Broker, callback: Callback, prefetch: int) -> None:
        self.broker = broker
        self._callback = callback
        self._prefetch = prefetch
        self.channel: Channel | None = None
        self._tag: str | None = None
        self._cancelled = False
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        broker = self.broker
        channel = await (await broker.connection()).channel()
        try:
            await channel.qos(self._prefetch)
            await broker._declare_work_queue()
            self._gone.clear()
            self._tag = await channel.consume(
                broker.topology.queue, self._callback, on_cancel=self._server_cancelled
            )
        except BaseException:
            with contextlib.suppress(*ERRORS):
                await channel.close()
            raise
        self.channel = channel
        channel.closed.add_done_callback(functools.partial(self._lost, channel))
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def _lost(self, channel: Channel, _closed: object) -> None:
        if channel is self.channel:
            self._gone.set()

    def _server_cancelled(self, tag: str) -> None:
        if tag == self._tag:
            logger.warning("RabbitMQ cancelled the consumer of %r", self.broker.topology.queue)
            self._gone.set()

    async def _watch(self) -> None:
        queue = self.broker.topology.queue
        while not self.cancelled():
            await self._gone.wait()
            if self.cancelled():
                return
            old, self.channel = self.channel, None
            if old is not None:
                with contextlib.suppress(*ERRORS):
                    await old.close()
            while not self.cancelled():
                await asyncio.sleep(self.broker.reconnect_interval)
                if self.cancelled():
                    return
                try:
                    await self.start()
                except ERRORS as exc:
                    logger.info("cannot consume %r yet (%r); trying again", queue, exc)
                    continue
                logger.info("consuming %r again", queue)
                break

    def cancelled(self) -> bool:
        return self._cancelled

    async def cancel(self) -> None:
        """No more deliveries (the ones in hand can still be settled)."""
        self._cancelled = True
        self._gone.set()
        channel = self.channel
        if channel is not None and self._tag is not None and channel.is_open:
            with contextlib.suppress(*ERRORS):
                await channel.cancel(self._tag)

    async def close(self) -> None:
        self._cancelled = True
        self._gone.set()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        channel, self.channel = self.channel, None
        if channel is not None:
            with contextlib.suppress(*ERRORS):
                await channel.close()
