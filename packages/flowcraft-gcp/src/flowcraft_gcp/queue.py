"""``JobQueue``: node jobs on a Pub/Sub topic, pulled from one shared subscription.

Topology (created by :meth:`JobQueue.ensure` when missing, names from :class:`QueueNames`):

* the job topic, and the workers' subscription on it, with a **dead-letter policy**
  (the dead-letter topic, ``max_delivery_attempts`` 5-100): it is what makes Pub/Sub
  number deliveries (``delivery_attempt`` is None without one) and what parks a
  message that kills its worker again and again;
* the dead-letter topic and a subscription on it that keeps what was parked (a topic
  without a subscription drops messages), listed by :meth:`JobQueue.dead_letters`.

Calls, all through Google's asyncio GAPIC clients:

==================  ==========================================================
``publish``         one ``Publish`` per fan-out (up to 1,000 messages / 9 MB)
``pull``            one unary ``Pull`` of at most the free slots, short deadline
``ack``             one ``Acknowledge`` per batch
``renew``           ``ModifyAckDeadline`` (at most 600 s)
``release``         ``ModifyAckDeadline(delay)``: delivered again after the delay
``dead_letter``     ``Publish`` to the dead-letter topic with the reason, then ack
==================  ==========================================================

Unary pull instead of streaming pull: a worker asks for exactly as many messages as
it has free slots, so nothing is hoarded (streaming pull's flow control lets one
client hold up to 1,000 by default) and no callback thread returns before its ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from google.api_core import exceptions as google_errors
from google.pubsub_v1.types import (
    DeadLetterPolicy,
    PubsubMessage,
    ReceivedMessage,
    Subscription,
)

from flowcraft.distributed.delivery import DeadLetter
from flowcraft_gcp._clients import GcpClients

__all__ = [
    "ERROR_ATTRIBUTE",
    "MAX_ACK_DEADLINE_SECONDS",
    "JobQueue",
    "QueueNames",
]

logger = logging.getLogger("flowcraft.gcp")

MAX_ACK_DEADLINE_SECONDS = 600
"""Pub/Sub's ceiling for an ack deadline (``ModifyAckDeadline``)."""

ERROR_ATTRIBUTE = "flowcraft-error"
"""The attribute of a dead letter that holds why it was parked."""

_MAX_PUBLISH = 1000  # messages per Publish request
_MAX_PUBLISH_BYTES = 9_000_000  # under the 10 MB request limit
_MAX_ACK_IDS = 1000  # ack ids per Acknowledge/ModifyAckDeadline request
_MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit on an attribute value
_SOURCE_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
_RESOURCE_ID = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


@dataclass(frozen=True, slots=True)
class QueueNames:
    """Resource ids (not paths) of the queue's topics and subscriptions.

    ``QueueNames.for_topic("jobs")`` gives ``jobs``, ``jobs-workers``, ``jobs-dead``
    and ``jobs-dead-kept``.
    """

    topic: str
    subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str

    def __post_init__(self) -> None:
        for name in (
            self.topic,
            self.subscription,
            self.dead_letter_topic,
            self.dead_letter_subscription,
        ):
            if not _RESOURCE_ID.fullmatch(name) or name.lower().startswith("goog"):
                raise ValueError(
                    f"{name!r} is not a Pub/Sub resource id: 3-255 characters, starting "
                    "with a letter, of letters, digits and - _ . ~ + % (not 'goog...')"
                )

    @classmethod
    def for_topic(cls, topic: str) -> QueueNames:
        return cls(topic, f"{topic}-workers", f"{topic}-dead", f"{topic}-dead-kept")


class JobQueue:
    """One job topic and its subscriptions in one project.

    Args:
        clients: the project's clients.
        names: the topics and subscriptions.
        ack_deadline_seconds: how long a pulled message stays with its worker before
            Pub/Sub delivers it again (renewed while its job runs; 10-600).
        max_delivery_attempts: the dead-letter policy's limit (5-100): a message
            delivered this often without an ack is parked by Pub/Sub itself.
        pull_timeout_seconds: how long one pull waits for messages when none is ready.
    """

    def __init__(
        self,
        clients: GcpClients,
        names: QueueNames,
        *,
        ack_deadline_seconds: int = 30,
        max_delivery_attempts: int = 100,
        pull_timeout_seconds: float = 2.0,
    ) -> None:
        if not 10 <= ack_deadline_seconds <= MAX_ACK_DEADLINE_SECONDS:
            raise ValueError("ack_deadline_seconds must be 10..600 (Pub/Sub's range)")
        if not 5 <= max_delivery_attempts <= 100:
            raise ValueError("max_delivery_attempts must be 5..100 (Pub/Sub's range)")
        self.clients = clients
        self.names = names
        self.ack_deadline_seconds = ack_deadline_seconds
        self.max_delivery_attempts = max_delivery_attempts
        self.pull_timeout_seconds = pull_timeout_seconds
        project = f"projects/{clients.project}"
        self.topic_path = f"{project}/topics/{names.topic}"
        self.subscription_path = f"{project}/subscriptions/{names.subscription}"
        self.dead_letter_topic_path = f"{project}/topics/{names.dead_letter_topic}"
        self.dead_letter_subscription_path = (
            f"{project}/subscriptions/{names.dead_letter_subscription}"
        )
        self._ensured = False
        self._ensuring: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(topic={self.topic_path!r})"

    # ------------------------------------------------------------ topology

    async def ensure(self) -> None:
        """Create the topics and subscriptions that do not exist (idempotent; once per
        queue object). On Google Cloud the Pub/Sub service agent also needs
        ``roles/pubsub.publisher`` on the dead-letter topic and
        ``roles/pubsub.subscriber`` on the subscription (IAM, not done here)."""
        if self._ensured:
            return
        if self._ensuring is None:
            self._ensuring = asyncio.Lock()
        async with self._ensuring:
            if self.created:  # by another task meanwhile
                return
            publisher = self.clients.publisher()
            subscriber = self.clients.subscriber()
            for topic in (self.topic_path, self.dead_letter_topic_path):
                self.clients.count("pubsub.admin")
                with contextlib.suppress(google_errors.AlreadyExists):
                    await publisher.create_topic(name=topic)
            subscriptions = [
                Subscription(
                    name=self.dead_letter_subscription_path,
                    topic=self.dead_letter_topic_path,
                    ack_deadline_seconds=60,
                ),
                Subscription(
                    name=self.subscription_path,
                    topic=self.topic_path,
                    ack_deadline_seconds=self.ack_deadline_seconds,
                    dead_letter_policy=DeadLetterPolicy(
                        dead_letter_topic=self.dead_letter_topic_path,
                        max_delivery_attempts=self.max_delivery_attempts,
                    ),
                ),
            ]
            for subscription in subscriptions:
                self.clients.count("pubsub.admin")
                with contextlib.suppress(google_errors.AlreadyExists):
                    await subscriber.create_subscription(request=subscription)
            self._ensured = True

    @property
    def created(self) -> bool:
        """Whether the topology is known to exist."""
        return self._ensured

    def assume_created(self) -> None:
        """Do not create anything: the topology exists (made by Terraform, gcloud, ...)."""
        self._ensured = True

    async def delete(self) -> None:
        """Delete the subscriptions and topics (tests, tear-down); absent ones are fine."""
        subscriber = self.clients.subscriber()
        publisher = self.clients.publisher()
        for subscription in (self.subscription_path, self.dead_letter_subscription_path):
            with contextlib.suppress(google_errors.NotFound):
                await subscriber.delete_subscription(subscription=subscription)
        for topic in (self.topic_path, self.dead_letter_topic_path):
            with contextlib.suppress(google_errors.NotFound):
                await publisher.delete_topic(topic=topic)
        self._ensured = False

    # ------------------------------------------------------------ sending

    async def publish(
        self, bodies: Sequence[bytes], attributes: Mapping[str, str] | None = None
    ) -> list[str]:
        """Publish ``bodies`` in as few requests as fit (one for any fan-out up to
        1,000 jobs); returns the message ids."""
        await self.ensure()
        return await self._publish(self.topic_path, bodies, attributes or {})

    async def _publish(
        self, topic: str, bodies: Sequence[bytes], attributes: Mapping[str, str]
    ) -> list[str]:
        publisher = self.clients.publisher()
        ids: list[str] = []
        for chunk in _chunks(bodies):
            messages = [PubsubMessage(data=body, attributes=dict(attributes)) for body in chunk]
            self.clients.count("pubsub.publish")
            response = await publisher.publish(topic=topic, messages=messages)
            ids.extend(response.message_ids)
        return ids

    # ------------------------------------------------------------ receiving

    async def pull(self, max_messages: int) -> list[ReceivedMessage]:
        """At most ``max_messages`` messages; [] when none arrived within the pull's
        short deadline."""
        if max_messages < 1:
            return []
        await self.ensure()
        self.clients.count("pubsub.pull")
        try:
            response = await self.clients.subscriber().pull(
                subscription=self.subscription_path,
                max_messages=max_messages,
                timeout=self.pull_timeout_seconds,
                retry=None,
            )
        except google_errors.DeadlineExceeded:
            return []
        messages = list(response.received_messages)
        if len(messages) > max_messages:  # never seen; the contract forbids it
            await self.modify(messages[max_messages:], 0)
            messages = messages[:max_messages]
        return messages

    async def ack(self, messages: Sequence[ReceivedMessage]) -> None:
        """Acknowledge (remove for good) ``messages``."""
        subscriber = self.clients.subscriber()
        ack_ids = [m.ack_id for m in messages]
        for start in range(0, len(ack_ids), _MAX_ACK_IDS):
            self.clients.count("pubsub.ack")
            await subscriber.acknowledge(
                subscription=self.subscription_path, ack_ids=ack_ids[start : start + _MAX_ACK_IDS]
            )

    async def modify(self, messages: Sequence[ReceivedMessage], seconds: float) -> None:
        """Set the ack deadline of ``messages`` to ``seconds`` from now (0: deliver again
        at once): renewals and hand-backs alike. Capped at 600 s."""
        deadline = max(0, min(math.ceil(seconds), MAX_ACK_DEADLINE_SECONDS))
        subscriber = self.clients.subscriber()
        ack_ids = [m.ack_id for m in messages]
        for start in range(0, len(ack_ids), _MAX_ACK_IDS):
            self.clients.count("pubsub.modify_ack_deadline")
            await subscriber.modify_ack_deadline(
                subscription=self.subscription_path,
                ack_ids=ack_ids[start : start + _MAX_ACK_IDS],
                ack_deadline_seconds=deadline,
            )

    async def dead_letter(self, message: ReceivedMessage, reason: str) -> None:
        """Publish the message to the dead-letter topic with ``reason`` (and its original
        attributes), then ack it. If the publish fails, the ack is not sent: the
        message comes back and is parked again."""
        await self.ensure()
        attributes = dict(message.message.attributes)
        attributes[ERROR_ATTRIBUTE] = _attribute(reason)
        attributes["flowcraft-message-id"] = message.message.message_id
        attributes["flowcraft-delivery-attempt"] = str(message.delivery_attempt or 0)
        await self._publish(self.dead_letter_topic_path, [message.message.data], attributes)
        await self.ack([message])

    async def dead_letters(self, limit: int = 100, *, remove: bool = False) -> list[DeadLetter]:
        """The parked jobs, oldest first as Pub/Sub hands them out (ours with their reason;
        Pub/Sub's own, after too many deliveries, with that count). Without ``remove``
        they stay parked."""
        await self.ensure()
        subscriber = self.clients.subscriber()
        found: dict[str, DeadLetter] = {}
        taken: list[str] = []
        try:
            while len(found) < limit:
                try:
                    response = await subscriber.pull(
                        subscription=self.dead_letter_subscription_path,
                        max_messages=min(limit - len(found), 1000),
                        timeout=self.pull_timeout_seconds,
                        retry=None,
                    )
                except google_errors.DeadlineExceeded:
                    break
                received = list(response.received_messages)
                if not received:
                    break
                for m in received:
                    taken.append(m.ack_id)
                    found.setdefault(m.message.message_id, _dead_letter(m))
        finally:
            if taken:
                if remove:
                    await subscriber.acknowledge(
                        subscription=self.dead_letter_subscription_path, ack_ids=taken
                    )
                else:
                    await subscriber.modify_ack_deadline(
                        subscription=self.dead_letter_subscription_path,
                        ack_ids=taken,
                        ack_deadline_seconds=0,
                    )
        return list(found.values())


def _dead_letter(received: ReceivedMessage) -> DeadLetter:
    attributes = received.message.attributes
    reason = attributes.get(ERROR_ATTRIBUTE)
    if reason is None:
        count = int(attributes.get(_SOURCE_COUNT, "0") or 0)
        reason = f"delivered {count} times without an ack (the subscription's dead-letter policy)"
    original_id = attributes.get("flowcraft-message-id", received.message.message_id)
    body = bytes(received.message.data).decode("utf-8", "backslashreplace")
    return DeadLetter(body=body, reason=reason, id=original_id)


def _attribute(text: str) -> str:
    """``text`` cut to Pub/Sub's 1,024-byte attribute limit on a character boundary."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= _MAX_ATTRIBUTE_BYTES:
        return encoded.decode("utf-8")
    return encoded[: _MAX_ATTRIBUTE_BYTES - 3].decode("utf-8", "ignore") + "..."


def _chunks(bodies: Sequence[bytes]) -> list[list[bytes]]:
    chunks: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for body in bodies:
        if current and (len(current) >= _MAX_PUBLISH or size + len(body) > _MAX_PUBLISH_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(body)
        size += len(body)
    if current:
        chunks.append(current)
    return chunks
