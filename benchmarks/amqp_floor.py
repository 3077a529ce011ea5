"""The AMQP part of a job alone: how much worker CPU aio-pika/aiormq cost, against a
lean prototype client (issue 23: what a leaner job path could save).

    uv run python benchmarks/amqp_floor.py                  # 8,000 messages, 3 rounds
    uv run python benchmarks/amqp_floor.py --messages 4000 --rounds 5

Each pass runs the job path's AMQP steps without the adapter: 64 messages are
published, then ``--concurrency`` deliveries at a time (the consumer's prefetch) each
publish the next message persistently with publisher confirms and ``mandatory``,
wait for the confirm, and ack the delivery, until ``--messages`` were consumed. Two
clients take turns on one RabbitMQ:

* ``aio-pika``: flowcraft-rabbitmq's own ``Broker`` (aio-pika's robust connection,
  publishes and consumes on the aiormq channels underneath, as the adapter does);
* ``lean``: one ``asyncio.Protocol`` that parses and writes the frames with pamqp
  (aiormq's own frame codec) with no task, queue or lock per frame: consuming on
  channel 1, publishing on channel 2 (a confirm channel). A prototype for the
  measurement only: no reconnection, heartbeats, returns or flow control.

Printed per client: CPU ms per message (this process's user + system time) and
messages per second, medians over the rounds. Backends: ``FLOWCRAFT_TEST_RABBITMQ_URL``
if set, else RabbitMQ started by ``flowcraft_backends``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import unquote, urlparse

from _workloads import backends
from pamqp import body as amqp_body
from pamqp import commands as amqp
from pamqp import frame as amqp_frame
from pamqp import header as amqp_header

from flowcraft_rabbitmq._broker import Broker, Delivery
from flowcraft_rabbitmq._settings import Topology

BODY = b'{"x":1}' * 20
PRIMED = 64

OnMessage = Callable[[int], Coroutine[Any, Any, None]]


class LeanProtocol(asyncio.Protocol):
    """A minimal AMQP 0-9-1 client: frames parsed in ``data_received``, one task per
    delivery, publisher confirms resolved from ``Basic.Ack`` (``multiple`` included)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.reply: asyncio.Future[Any] | None = None
        self.confirms: dict[int, asyncio.Future[None]] = {}
        self.published = 0
        self.delivery_tag = 0
        self.on_message: OnMessage | None = None
        self.properties = amqp.Basic.Properties(content_type="application/json", delivery_mode=2)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 7:
            size = int.from_bytes(self.buffer[3:7], "big") + 8  # header 7, end byte 1
            if len(self.buffer) < size:
                return
            _, _, frame = amqp_frame.unmarshal(bytes(self.buffer[:size]))
            del self.buffer[:size]
            self._frame(frame)

    def _frame(self, frame: Any) -> None:
        name = frame.name
        if name == "Basic.Deliver":
            self.delivery_tag = frame.delivery_tag
        elif name == "ContentBody" or (name == "ContentHeader" and frame.body_size == 0):
            assert self.on_message is not None
            asyncio.get_running_loop().create_task(self.on_message(self.delivery_tag))
        elif name == "ContentHeader" or name == "Heartbeat":
            pass
        elif name == "Basic.Ack":
            tags = [t for t in self.confirms if t <= frame.delivery_tag] if frame.multiple else []
            for tag in tags or [frame.delivery_tag]:
                waiter = self.confirms.pop(tag, None)
                if waiter is not None:
                    waiter.set_result(None)
        else:
            if name == "Connection.Tune":
                self.write(0, amqp.Connection.TuneOk(frame.channel_max, frame.frame_max, 0))
            if self.reply is not None and not self.reply.done():
                self.reply.set_result(frame)

    def write(self, channel: int, frame: Any) -> None:
        assert self.transport is not None
        self.transport.write(amqp_frame.marshal(frame, channel))

    async def call(self, channel: int, frame: Any | None) -> Any:
        """Send ``frame`` (or nothing) and return the next reply frame."""
        self.reply = asyncio.get_running_loop().create_future()
        if frame is not None:
            self.write(channel, frame)
        return await self.reply

    async def publish(self, routing_key: str) -> None:
        assert self.transport is not None
        self.published += 1
        confirm = asyncio.get_running_loop().create_future()
        self.confirms[self.published] = confirm
        frames = (
            amqp.Basic.Publish(exchange="", routing_key=routing_key, mandatory=True),
            amqp_header.ContentHeader(0, len(BODY), self.properties),
            amqp_body.ContentBody(BODY),
        )
        self.transport.write(b"".join(amqp_frame.marshal(f, 2) for f in frames))
        await confirm

    def ack(self, delivery_tag: int) -> None:
        self.write(1, amqp.Basic.Ack(delivery_tag))


async def _pass(
    consume: Callable[[OnMessage], Awaitable[None]],
    publish: Callable[[], Awaitable[None]],
    ack: Callable[[int], Awaitable[None] | None],
    messages: int,
) -> dict[str, float]:
    done = asyncio.Event()
    count = 0

    async def on_message(tag: int) -> None:
        nonlocal count
        count += 1
        if count + PRIMED <= messages:
            await publish()
        result = ack(tag)
        if result is not None:
            await result
        if count >= messages:
            done.set()

    cpu, began = time.process_time(), time.perf_counter()
    await consume(on_message)
    await done.wait()
    cpu, seconds = time.process_time() - cpu, time.perf_counter() - began
    return {"cpu_ms": 1000 * cpu / messages, "per_s": messages / seconds}


async def measure_aio_pika(url: str, messages: int, concurrency: int) -> dict[str, float]:
    broker = Broker(Topology.for_queue(f"floor-{uuid.uuid4().hex[:10]}"), url=url)
    await broker.declare()
    for _ in range(PRIMED):
        await broker.publish(BODY)
    deliveries: dict[int, Delivery] = {}
    consumers: list[Any] = []

    async def consume(on_message: OnMessage) -> None:
        async def deliver(delivery: Delivery) -> None:
            tag = id(delivery)
            deliveries[tag] = delivery
            await on_message(tag)

        consumers.append(await broker.consume(deliver, concurrency))

    async def ack(tag: int) -> None:
        await deliveries.pop(tag).ack()

    try:
        return await _pass(consume, lambda: broker.publish(BODY), ack, messages)
    finally:
        for consumer in consumers:
            await consumer.cancel()
            await consumer.close()
        await broker.delete_topology()
        await broker.aclose()


async def measure_lean(url: str, messages: int, concurrency: int) -> dict[str, float]:
    broker = Broker(Topology.for_queue(f"floor-{uuid.uuid4().hex[:10]}"), url=url)
    await broker.declare()  # the queues, through the real client
    for _ in range(PRIMED):
        await broker.publish(BODY)
    parts = urlparse(url)
    loop = asyncio.get_running_loop()
    transport, lean = await loop.create_connection(
        LeanProtocol, parts.hostname or "127.0.0.1", parts.port or 5672
    )
    try:
        started = lean.call(0, None)
        transport.write(b"AMQP\x00\x00\x09\x01")
        await started
        login = f"\0{unquote(parts.username or 'guest')}\0{unquote(parts.password or 'guest')}"
        await lean.call(0, amqp.Connection.StartOk(client_properties={}, response=login))
        vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        await lean.call(0, amqp.Connection.Open(virtual_host=vhost))
        await lean.call(1, amqp.Channel.Open())
        await lean.call(2, amqp.Channel.Open())
        await lean.call(2, amqp.Confirm.Select())
        await lean.call(1, amqp.Basic.Qos(prefetch_count=concurrency))
        queue = broker.topology.queue

        async def consume(on_message: OnMessage) -> None:
            lean.on_message = on_message
            await lean.call(1, amqp.Basic.Consume(queue=queue, consumer_tag="floor"))

        return await _pass(consume, lambda: lean.publish(queue), lean.ack, messages)
    finally:
        transport.close()
        await broker.delete_topology()
        await broker.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    urls, pool = backends({"rabbitmq": "amqp_url"})
    try:
        found: dict[str, list[dict[str, float]]] = {"aio-pika": [], "lean": []}
        for _ in range(args.rounds):
            for name, measure in (("aio-pika", measure_aio_pika), ("lean", measure_lean)):
                found[name].append(await measure(urls["amqp_url"], args.messages, args.concurrency))
        for name, rounds in found.items():
            cpu = statistics.median(r["cpu_ms"] for r in rounds)
            per_s = statistics.median(r["per_s"] for r in rounds)
            each = ", ".join(f"{r['cpu_ms']:.3f}" for r in rounds)
            print(f"{name:<9} {cpu:.3f} ms CPU / message ({each}), {per_s:.0f} messages/s")
    finally:
        if pool is not None:
            pool.stop_all()


if __name__ == "__main__":
    asyncio.run(main())
