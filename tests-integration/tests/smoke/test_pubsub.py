"""Pub/Sub emulator smoke tests with google-cloud-pubsub: publish, pull, ack, nack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from google.api_core.exceptions import NotFound
from google.cloud.pubsub_v1 import (  # type: ignore[import-untyped]  # no py.typed
    PublisherClient,
    SubscriberClient,
)
from google.pubsub_v1.types import ReceivedMessage

from flowcraft_backends import RestartUnsupported, RunningService

PROJECT = "flowcraft-smoke"


@pytest.fixture
def clients(
    pubsub_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[PublisherClient, SubscriberClient]]:
    # The client libraries switch to a plaintext channel when this variable is set.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_service.extra["PUBSUB_EMULATOR_HOST"])
    publisher = PublisherClient()
    subscriber = SubscriberClient()
    try:
        yield publisher, subscriber
    finally:
        publisher.stop()
        subscriber.close()


def _topic_and_subscription(
    publisher: PublisherClient, subscriber: SubscriberClient
) -> tuple[str, str]:
    suffix = uuid.uuid4().hex[:12]
    topic = publisher.topic_path(PROJECT, f"smoke-{suffix}")
    subscription = subscriber.subscription_path(PROJECT, f"smoke-sub-{suffix}")
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=30)
    return topic, subscription


def _pull_until(
    subscriber: SubscriberClient, subscription: str, count: int, timeout: float = 20.0
) -> list[ReceivedMessage]:
    """Pull until ``count`` messages arrived (the emulator may hand them out in parts)."""
    received: list[ReceivedMessage] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=5.0)
        received.extend(response.received_messages)
    return received


def test_publish_pull_ack_and_nack(
    clients: tuple[PublisherClient, SubscriberClient],
) -> None:
    publisher, subscriber = clients
    topic, subscription = _topic_and_subscription(publisher, subscriber)
    try:
        ids = [
            publisher.publish(topic, b"first", job="1").result(timeout=10),
            publisher.publish(topic, b"second", job="2").result(timeout=10),
        ]
        assert len(set(ids)) == 2

        received = _pull_until(subscriber, subscription, 2)
        by_data = {m.message.data: m for m in received}
        assert set(by_data) == {b"first", b"second"}
        assert by_data[b"first"].message.attributes["job"] == "1"
        assert by_data[b"first"].message.message_id in ids

        # Ack the first; nack the second (deadline 0): only the second comes back.
        subscriber.acknowledge(subscription=subscription, ack_ids=[by_data[b"first"].ack_id])
        subscriber.modify_ack_deadline(
            subscription=subscription, ack_ids=[by_data[b"second"].ack_id], ack_deadline_seconds=0
        )
        again = _pull_until(subscriber, subscription, 1)
        assert [m.message.data for m in again] == [b"second"]
        subscriber.acknowledge(subscription=subscription, ack_ids=[again[0].ack_id])
    finally:
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)


def test_restart_answers_on_the_same_port(
    pubsub_service: RunningService,
    clients: tuple[PublisherClient, SubscriberClient],
) -> None:
    if pubsub_service.how != "local":
        with pytest.raises(RestartUnsupported):
            pubsub_service.restart()
        return
    publisher, subscriber = clients
    topic, subscription = _topic_and_subscription(publisher, subscriber)
    url_before = pubsub_service.url

    pubsub_service.restart()

    assert pubsub_service.url == url_before
    # The emulator keeps everything in memory: the restarted one starts empty.
    with pytest.raises(NotFound):
        publisher.get_topic(topic=topic)
    topic, subscription = _topic_and_subscription(publisher, subscriber)
    publisher.publish(topic, b"after restart").result(timeout=10)
    received = _pull_until(subscriber, subscription, 1)
    assert [m.message.data for m in received] == [b"after restart"]
    subscriber.acknowledge(subscription=subscription, ack_ids=[received[0].ack_id])
