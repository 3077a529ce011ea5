"""The AMQP part of a job alone: how much worker CPU flowcraft-rabbitmq's own client
costs, against aio-pika (issue 23: the client it replaced).

    uv run python benchmarks/amqp_floor.py                  # 8,000 messages, 3 rounds
    uv run python benchmarks/amqp_floor.py --messages 4000 --rounds 5

Each pass runs the job path's AMQP steps without the adapter: 64 messages are
published, then ``--concurrency`` deliveries at a time (the consumer's prefetch) each
publish the next message persistently with publisher confirms and ``mandatory``,
wait for the confirm, and ack the delivery, until ``--messages`` were consumed. Two
clients take turns on one RabbitMQ:

* ``broker``: flowcraft-rabbitmq's ``Broker`` (its ``_amqp`` client), as the adapter
  uses it;
* ``aio-pika``: aio-pika's robust connection, a confirm channel, ``queue.consume``,
  ``default_exchange.publish(..., mandatory=True)`` and ``message.ack()`` (aio-pika
  is in the workspace for the tests; the package does not use it).

Printed per client: CPU ms per message (this process's user + system time) and
messages per second, medians over the rounds. Backends: ``FLOWCRAFT_TEST_RABBITMQ_URL``
if set, else RabbitMQ started by ``flowcraft_backends``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aio_pika
from _workloads import backends

from flowcraft_rabbitmq._broker import Broker, Delivery
from flowcraft_rabbitmq._settings import Topology

BODY = b'{"x":1}' * 20
PRIMED = 64

OnMessage = Callable[[int], Coroutine[Any, Any, None]]


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


async def measure_broker(url: str, messages: int, concurrency: int) -> dict[str, float]:
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


async def measure_aio_pika(url: str, messages: int, concurrency: int) -> dict[str, float]:
    name = f"floor-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect_robust(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=concurrency)
        queue = await channel.declare_queue(name, durable=True)

        async def publish() -> None:
            message = aio_pika.Message(
                BODY,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await channel.default_exchange.publish(message, name, mandatory=True)

        for _ in range(PRIMED):
            await publish()
        deliveries: dict[int, Any] = {}

        async def consume(on_message: OnMessage) -> None:
            async def deliver(message: Any) -> None:
                tag = id(message)
                deliveries[tag] = message
                await on_message(tag)

            await queue.consume(deliver)

        async def ack(tag: int) -> None:
            await deliveries.pop(tag).ack()

        return await _pass(consume, publish, ack, messages)
    finally:
        with contextlib.suppress(Exception):
            cleanup = await connection.channel()
            await cleanup.queue_delete(name)
        await connection.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    urls, pool = backends({"rabbitmq": "amqp_url"})
    try:
        found: dict[str, list[dict[str, float]]] = {"broker": [], "aio-pika": []}
        for _ in range(args.rounds):
            for name, measure in (("broker", measure_broker), ("aio-pika", measure_aio_pika)):
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
