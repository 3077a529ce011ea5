"""Kafka smoke test: produce, consume in a consumer group with commits, restart()."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from flowcraft_backends import RestartUnsupported, RunningService

PARTITIONS = 3


def _create_topic(bootstrap: str, partitions: int = PARTITIONS) -> str:
    topic = f"smoke-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1)]
    )
    futures[topic].result(timeout=30)
    return topic


def _produce(bootstrap: str, topic: str, messages: dict[str, str]) -> list[Message]:
    delivered: list[Message] = []
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            errors.append(error)
        else:
            delivered.append(message)

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in messages.items():
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []
    return delivered


def _consumer(bootstrap: str, group: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )


def _consume(consumer: Consumer, count: int, timeout: float = 60.0) -> list[Message]:
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        assert message.error() is None, message.error()
        received.append(message)
    return received


@pytest.fixture
def bootstrap(kafka_service: RunningService) -> str:
    return kafka_service.url


def test_consumer_group_receives_and_commits(bootstrap: str) -> None:
    topic = _create_topic(bootstrap)
    sent = {f"k{i}": f"v{i}" for i in range(30)}
    delivered = _produce(bootstrap, topic, sent)
    assert len(delivered) == len(sent)
    assert len({m.partition() for m in delivered}) > 1  # keys spread over partitions

    group = f"group-{uuid.uuid4().hex[:8]}"
    consumer = _consumer(bootstrap, group)
    try:
        consumer.subscribe([topic])
        received = _consume(consumer, len(sent))
        got = {m.key().decode(): m.value().decode() for m in received}  # type: ignore[union-attr]
        assert got == sent
        consumer.commit(asynchronous=False)
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=30
        )
    finally:
        consumer.close()
    # Committed offsets are the next offset to read: together, every message once.
    assert sum(tp.offset for tp in committed) == len(sent)

    # The same group resumes after its commits: only the new message arrives.
    _produce(bootstrap, topic, {"late": "after-commit"})
    consumer = _consumer(bootstrap, group)
    try:
        consumer.subscribe([topic])
        later = _consume(consumer, 1)
        assert [(m.key(), m.value()) for m in later] == [(b"late", b"after-commit")]
        assert _consume(consumer, 1, timeout=2.0) == []
    finally:
        consumer.close()


def test_restart_keeps_port_and_messages(kafka_service: RunningService) -> None:
    if kafka_service.how != "local":
        with pytest.raises(RestartUnsupported):
            kafka_service.restart()
        return
    topic = _create_topic(kafka_service.url, partitions=1)
    _produce(kafka_service.url, topic, {"k": "survives"})
    url_before = kafka_service.url

    kafka_service.restart()

    assert kafka_service.url == url_before
    consumer = _consumer(kafka_service.url, f"group-{uuid.uuid4().hex[:8]}")
    try:
        consumer.subscribe([topic])
        received = _consume(consumer, 1)
    finally:
        consumer.close()
    assert [(m.key(), m.value()) for m in received] == [(b"k", b"survives")]
