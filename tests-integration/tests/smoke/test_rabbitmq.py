"""RabbitMQ smoke test: a confirmed publish, then consume and ack (aio-pika)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aiormq.abc import ConfirmationFrameType
from pamqp.commands import Basic

from flowcraft_backends import RunningService


async def test_confirmed_publish_then_consume(rabbitmq_service: RunningService) -> None:
    connection = await aio_pika.connect(rabbitmq_service.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"smoke-{uuid.uuid4().hex}", durable=True)
        body = uuid.uuid4().bytes

        confirmation: ConfirmationFrameType | None = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert isinstance(confirmation, Basic.Ack)

        async with asyncio.timeout(10), queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    assert message.body == body
                break
        await asyncio.sleep(0.1)
        declared = await channel.declare_queue(queue.name, passive=True)
        assert declared.declaration_result.message_count == 0
        await queue.delete()
    finally:
        await connection.close()
