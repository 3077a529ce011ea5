"""RabbitMQ for the adapter: the topology, confirmed publishing, consuming, dead letters.

Only stock RabbitMQ features (no plugins):

* a durable work queue whose rejected messages dead-letter to a fanout
  exchange ``<queue>.dlx`` bound to the durable queue ``<queue>.dead``;
* delayed redelivery: a durable delay queue per delay bucket, without consumers,
  whose messages carry a per-message TTL (``expiration``) and dead-letter back
  to the work queue through the default exchange when it runs out;
* persistent messages published on a channel with publisher confirms, as
  ``mandatory`` (an unroutable message is an error, not a silent drop);
* a robust connection (``aio_pika.connect_robust``) that reconnects after a broker
  restart and restores the channels, the QoS and the consumer by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from ssl import SSLContext
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, PublishError
from aiormq.abc import DeliveredMessage

from flowcraft.distributed import DeadLetter
from flowcraft_rabbitmq._settings import DELAY_BUCKETS_MS, HEADER_ERROR, Topology

__all__ = ["Broker", "Delivery"]

logger = logging.getLogger("flowcraft.rabbitmq.broker")

Callback = Callable[["Delivery"], Awaitable[None]]


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
        url: an ``amqp://`` or ``amqps://`` URL (used when no connection is given).
        connection: a robust connection to share; it stays open after :meth:`aclose`.
        ssl_context: TLS for ``url`` (``amqps://``), passed to ``connect_robust``.
        reconnect_interval: seconds between reconnection attempts.
        publish_timeout: how long a publish keeps trying (through a reconnect)
            before it raises.
        connect_kwargs: more ``aio_pika.connect_robust`` options (``ssl_options``,
            ``client_properties``, ``timeout``, ...).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        url: str | None = None,
        connection: AbstractRobustConnection | None = None,
        ssl_context: SSLContext | None = None,
        reconnect_interval: float = 1.0,
        publish_timeout: float = 60.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if (url is None) == (connection is None):
            raise ValueError("pass exactly one of amqp_url= or connection= for RabbitMQ")
        self.topology = topology
        self._url = url
        self._connection = connection
        self._owns_connection = connection is None
        self._ssl_context = ssl_context
        self._reconnect_interval = reconnect_interval
        self.publish_timeout = publish_timeout
        self._connect_kwargs = dict(connect_kwargs or {})
        self._channel: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._lock = asyncio.Lock()
        self._id_prefix = f"{secrets.token_hex(8)}-"
        self._published = 0
        self.round_trips: Counter[str] = Counter()
        """Confirmed publishes and declarations (one round trip each) and acks (one frame)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.topology.queue!r})"  # never the URL

    # ------------------------------------------------------------------ connection

    async def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            async with self._lock:
                if self._connection is None:
                    kwargs: dict[str, Any] = {
                        "reconnect_interval": self._reconnect_interval,
                        **self._connect_kwargs,
                    }
                    if self._ssl_context is not None:
                        kwargs["ssl_context"] = self._ssl_context
                    self._connection = await aio_pika.connect_robust(self._url, **kwargs)
        return self._connection

    async def declare(self) -> None:
        """Connect and declare the work queue and the dead-letter exchange and queue."""
        await self._publisher()

    async def _publisher(self) -> AbstractChannel:
        """The confirm channel every publish goes through; declares the work queue."""
        if self._channel is None:
            connection = await self.connection()
            async with self._lock:
                if self._channel is None:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    await self._declare_work_queue(channel)
                    self._channel = channel
        return self._channel

    async def _declare_work_queue(self, channel: AbstractChannel) -> AbstractQueue:
        names = self.topology
        dlx = await channel.declare_exchange(
            names.dead_exchange, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(names.dead_queue, durable=True)
        await dead.bind(dlx, routing_key="")
        queue = await channel.declare_queue(
            names.queue, durable=True, arguments={"x-dead-letter-exchange": names.dead_exchange}
        )
        self.round_trips["declare"] += 4
        return queue

    async def _ensure_delay_queue(self, channel: AbstractChannel, bucket_ms: int) -> str:
        name = self.topology.delay_queue(bucket_ms)
        if name not in self._declared:
            await channel.declare_queue(
                name,
                durable=True,
                arguments={
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": self.topology.queue,
                },
            )
            self.round_trips["declare"] += 1
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
        deadline = time.monotonic() + self.publish_timeout
        pause = 0.1
        while True:
            try:
                await self._publish_once(body, headers, delay_ms, dead)
                return
            except PublishError:
                # Unroutable: a queue was deleted behind our back; declare them again.
                if time.monotonic() >= deadline:
                    raise
                self._declared.clear()
                if self._channel is not None:
                    with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                        await self._declare_work_queue(self._channel)
            except CONNECTION_EXCEPTIONS as exc:
                if time.monotonic() >= deadline:
                    raise
                logger.info("publish failed (%s); retrying in %.1f s", type(exc).__name__, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def _publish_once(
        self, body: bytes, headers: Mapping[str, Any] | None, delay_ms: int, dead: bool
    ) -> None:
        channel = await self._publisher()
        if not headers and delay_ms <= 0 and not dead:
            # A job (the hot path): straight to the aiormq channel underneath aio-pika's
            # robust one (aio-pika's own API for it), without building an
            # aio_pika.Message. The same frames, confirm and mandatory flag; an
            # unroutable message raises PublishError here too. wait=False: the frames
            # are queued for the socket without a second future awaiting their write
            # (the confirm awaited next comes after it anyway; a connection lost before
            # the write rejects the confirm, and the publish is retried).
            # (aiormq's abstract channel lacks basic_publish's ``wait``; its channel has it.)
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            # A message id of our own (aiormq maps a returned message to its publish by
            # it): a counter is cheaper than the random UUID aiormq would make.
            self._published += 1
            properties = aiormq.spec.Basic.Properties(
                content_type="application/json",
                delivery_mode=2,
                message_id=f"{self._id_prefix}{self._published}",
            )
            self.round_trips["publish"] += 1
            await underlay.basic_publish(
                body,
                routing_key=self.topology.queue,
                properties=properties,
                mandatory=True,
                timeout=self.publish_timeout,
                wait=False,
            )
            return
        message = aio_pika.Message(
            body,
            headers=dict(headers or {}),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            expiration=delay_ms / 1000 if delay_ms > 0 else None,
        )
        if dead:
            exchange = await channel.get_exchange(self.topology.dead_exchange, ensure=False)
            routing_key = ""
        else:
            exchange = channel.default_exchange
            routing_key = (
                await self._ensure_delay_queue(channel, delay_ms)
                if delay_ms > 0
                else self.topology.queue
            )
        self.round_trips["publish"] += 1
        await exchange.publish(message, routing_key, mandatory=True, timeout=self.publish_timeout)

    # ------------------------------------------------------------------ consuming

    async def consume(self, callback: Callback, prefetch: int) -> _Consumer:
        """Start delivering the work queue to ``callback``, ``prefetch`` unacked at most."""
        connection = await self.connection()
        await self._publisher()  # the topology exists before we consume
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        await self._declare_work_queue(channel)
        consumer = _Consumer(channel, self.topology.queue, callback)
        await consumer.start()
        return consumer

    # ------------------------------------------------------------------ operating

    async def dead_letters(self, limit: int = 100, *, remove: bool = False) -> list[DeadLetter]:
        """Up to ``limit`` dead-lettered messages; ``remove`` acks (deletes) them,
        otherwise they stay queued (read on a channel that is closed unacked)."""
        connection = await self.connection()
        await self._publisher()
        channel = await connection.channel(publisher_confirms=False)
        found: list[DeadLetter] = []
        try:
            queue = await channel.declare_queue(self.topology.dead_queue, durable=True)
            while len(found) < limit:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                headers = dict(message.headers or {})
                error = _header_text(headers.get(HEADER_ERROR))
                if not error:
                    error = f"dead-lettered by RabbitMQ ({_death_reason(headers)})"
                found.append(DeadLetter(message.body, error, attributes=headers))
                if remove:
                    await message.ack()
        finally:
            await channel.close()  # unacked messages go back to the queue
        return found

    async def depths(self) -> dict[str, int]:
        """Messages ready in the work queue, the dead-letter queue and each delay queue."""
        publisher = await self._publisher()
        for bucket in DELAY_BUCKETS_MS:
            await self._ensure_delay_queue(publisher, bucket)
        # Passive declarations on a fresh channel: a robust channel answers a passive
        # declaration of a queue it declared from its cache.
        connection = await self.connection()
        channel = await connection.channel(publisher_confirms=False)
        depths: dict[str, int] = {}
        try:
            names = self.topology
            for name in [names.queue, names.dead_queue, *names.delay_queues()]:
                queue = await channel.declare_queue(name, passive=True, robust=False)
                depths[name] = int(queue.declaration_result.message_count or 0)
        finally:
            await channel.close()
        return depths

    async def delete_topology(self) -> None:
        """Delete every queue and the exchange of this namespace (tests, teardown)."""
        connection = await self.connection()
        channel = await connection.channel(publisher_confirms=False)
        try:
            names = self.topology
            for name in [names.queue, names.dead_queue, *names.delay_queues()]:
                await channel.queue_delete(name)
            await channel.exchange_delete(names.dead_exchange)
        finally:
            await channel.close()
        self._declared.clear()
        self._channel = None

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await channel.close()
        if self._owns_connection and self._connection is not None:
            await self._connection.close()
            self._connection = None


class Delivery:
    """A message delivered to the worker, as the aiormq channel under aio-pika's robust
    one gave it (no aio_pika.IncomingMessage and no second task per delivery)."""

    __slots__ = ("_channel", "_tag", "body", "headers")

    def __init__(self, message: DeliveredMessage) -> None:
        self.body: bytes = message.body
        self.headers: Mapping[str, Any] = message.header.properties.headers or {}
        self._channel = message.channel
        self._tag = message.delivery_tag

    async def ack(self) -> None:
        """Ack (sent without waiting for the socket: a lost ack is a redelivery)."""
        assert self._tag is not None
        await self._channel.basic_ack(self._tag, wait=False)

    async def nack(self, *, requeue: bool) -> None:
        assert self._tag is not None
        await self._channel.basic_nack(self._tag, requeue=requeue)

    async def reject(self, *, requeue: bool) -> None:
        assert self._tag is not None
        await self._channel.basic_reject(self._tag, requeue=requeue)


class _Consumer:
    """The work queue's consumer on a robust channel: started on the channel underneath,
    and again each time aio-pika reopens the channel (after a reconnect: QoS and the
    queue's declaration are restored by aio-pika first). cancel stops deliveries;
    close ends the channel."""

    def __init__(self, channel: AbstractRobustChannel, queue: str, callback: Callback) -> None:
        self.channel = channel
        self.queue = queue
        self._callback = callback
        self._tag: str | None = None
        self._cancelled = False
        channel.reopen_callbacks.add(self._reopened)

    async def start(self) -> None:
        underlay = await self.channel.get_underlay_channel()
        ok = await underlay.basic_consume(self.queue, self._deliver, no_ack=False)
        self._tag = ok.consumer_tag

    async def _deliver(self, message: DeliveredMessage) -> None:
        await self._callback(Delivery(message))

    async def _reopened(self, _channel: Any) -> None:
        if not self._cancelled:
            await self.start()
            logger.info("consuming %r again after the channel was reopened", self.queue)

    async def cancel(self) -> None:
        self._cancelled = True
        if self._tag is None:
            return
        with contextlib.suppress(*CONNECTION_EXCEPTIONS):
            underlay = await self.channel.get_underlay_channel()
            await underlay.basic_cancel(self._tag)

    async def close(self) -> None:
        self.channel.reopen_callbacks.discard(self._reopened)
        if not self.channel.is_closed:
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await self.channel.close()
