"""Azure Storage Queue calls, as the pull loop needs them.

Facts this is built on (checked against Azurite and the service's REST reference):

* A receive asks for ``n`` messages in one request (at most 32). The SDK's pager
  keeps requesting pages until ``max_messages`` arrived or a page comes back
  empty, so this takes the first page only: one request per receive, never more
  messages than asked.
* Every ``update_message`` (a renewal, a release) answers with a NEW pop receipt and
  the old one stops working; a delete must use the newest. So the calls on one
  message are serialised by its lock and each stores the receipt it got.
* ``dequeue_count`` counts every receive, including those after a release: it says
  how often a message came round (poison detection), not how many attempts failed.
* There is no dead-letter queue: a parked message is copied, with its reason, to a
  poison queue (``<queue>-poison``), then deleted.
* There is no long polling: an empty receive answers at once (the adapter backs off).
* A message holds at most 64 KiB of text (XML-safe); there is no batch send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.queue.aio import QueueClient

from flowcraft.distributed.delivery import DeadLetter

__all__ = ["MAX_MESSAGE_BYTES", "MAX_RECEIVE", "AzureMessage", "StorageQueue"]

MAX_RECEIVE = 32
"""The most messages one receive may ask for."""

MAX_MESSAGE_BYTES = 64 * 1024
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600
_MAX_REASON_CHARS = 4000


@dataclass(eq=False, slots=True)
class AzureMessage:
    """A received message: its newest pop receipt and the lock its calls take turns on."""

    id: str
    body: str
    dequeue_count: int
    pop_receipt: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    gone: bool = False


def _seconds(value: float) -> int:
    """Azure takes whole seconds: round up (a release never comes early)."""
    return max(0, min(math.ceil(value), MAX_VISIBILITY_SECONDS))


class StorageQueue:
    """One job queue and its poison queue, on ``azure.storage.queue.aio`` clients."""

    def __init__(self, queue: QueueClient, poison: QueueClient) -> None:
        self.queue = queue
        self.poison = poison
        self.requests: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.queue.queue_name!r})"

    def _count(self, call: str) -> None:
        self.requests[call] = self.requests.get(call, 0) + 1

    async def create(self) -> None:
        """Create both queues if missing."""
        for client in (self.queue, self.poison):
            with contextlib.suppress(ResourceExistsError):
                await client.create_queue()

    async def delete(self) -> None:
        for client in (self.queue, self.poison):
            with contextlib.suppress(ResourceNotFoundError):
                await client.delete_queue()

    async def send(self, body: str, *, delay_seconds: float = 0.0) -> None:
        self._count("send")
        if delay_seconds > 0:
            await self.queue.send_message(body, visibility_timeout=_seconds(delay_seconds))
        else:
            await self.queue.send_message(body)

    async def receive(self, max_messages: int, visibility_seconds: float) -> list[AzureMessage]:
        """Up to ``max_messages`` (<= 32) messages in ONE request."""
        n = max(1, min(max_messages, MAX_RECEIVE))
        self._count("receive")
        pages = self.queue.receive_messages(
            messages_per_page=n, max_messages=n, visibility_timeout=_seconds(visibility_seconds)
        ).by_page()
        try:
            page = await pages.__anext__()
        except StopAsyncIteration:
            return []
        return [
            AzureMessage(m.id, str(m.content or ""), int(m.dequeue_count or 1), str(m.pop_receipt))
            async for m in page
        ]

    async def set_visibility(self, message: AzureMessage, seconds: float) -> None:
        """Hide ``message`` for ``seconds`` from now, keeping the receipt this returns.
        A message already deleted (or whose receipt went stale) is left alone."""
        async with message.lock:
            if message.gone:
                return
            self._count("update")
            try:
                updated = await self.queue.update_message(
                    message.id,
                    pop_receipt=message.pop_receipt,
                    visibility_timeout=_seconds(seconds),
                )
            except ResourceNotFoundError:
                message.gone = True  # deleted, or received again by someone else
                return
            if updated.pop_receipt:
                message.pop_receipt = updated.pop_receipt

    async def remove(self, message: AzureMessage) -> None:
        async with message.lock:
            if message.gone:
                return
            self._count("delete")
            try:
                await self.queue.delete_message(message.id, message.pop_receipt)
            except HttpResponseError as exc:
                if not _lost(exc):
                    raise
            message.gone = True

    async def park(self, message: AzureMessage, reason: str) -> None:
        """Copy ``message`` with ``reason`` to the poison queue, then delete it."""
        self._count("send")
        await self.poison.send_message(poison_body(message, reason))
        await self.remove(message)

    async def dead_letters(self, limit: int = 32) -> list[DeadLetter]:
        """A look at the poison queue (``peek``: nothing is taken; at most 32)."""
        found: list[DeadLetter] = []
        for m in await self.poison.peek_messages(max_messages=max(1, min(limit, MAX_RECEIVE))):
            try:
                data: Any = json.loads(str(m.content))
                found.append(DeadLetter(str(data["body"]), str(data["reason"]), str(data["id"])))
            except (ValueError, KeyError, TypeError):
                found.append(DeadLetter(str(m.content), "", m.id))
        return found


def _lost(exc: HttpResponseError) -> bool:
    """The message is no longer ours: deleted (404), or received again by another
    consumer, whose pop receipt replaced ours (400 ``PopReceiptMismatch``). Then it
    will be (or was) delivered again: harmless under the protocol."""
    code = getattr(exc, "error_code", None)
    return isinstance(exc, ResourceNotFoundError) or code == "PopReceiptMismatch"


def poison_body(message: AzureMessage, reason: str) -> str:
    """``{"id", "reason", "dequeueCount", "body"}`` as ASCII JSON (XML-safe), cut to fit
    64 KiB: the reason first, then the body (marked ``truncated``)."""
    record: dict[str, Any] = {
        "id": message.id,
        "reason": reason[:_MAX_REASON_CHARS],
        "dequeueCount": message.dequeue_count,
        "body": message.body,
    }
    text = json.dumps(record, ensure_ascii=True)
    while len(text) > MAX_MESSAGE_BYTES and record["body"]:
        # Shrink the body in proportion to the overshoot (escapes make it uneven).
        body: str = record["body"]
        keep = int(len(body) * (MAX_MESSAGE_BYTES - 256) / len(text))
        record["body"] = body[: min(keep, len(body) - 1)]
        record["truncated"] = True
        text = json.dumps(record, ensure_ascii=True)
    return text
