"""The job queue as Python sees it: a Cloudflare Queue drained into an inbox object.

Sending goes through the Worker's queue producer (``env.JOBS.sendBatch``); the
Worker's ``queue()`` consumer moves each message into the ``FlowcraftInbox``
object named in its envelope and acks it only after that write. Python then pulls
from the inbox: each pulled message is hidden for a visibility timeout under a
lease token, and renewed, acked, released with a delay or dead-lettered with that
token (a copy whose lease was lost changes nothing).

``direct=True`` skips the Cloudflare Queue and writes into the inbox at once
(same guarantees: the inbox is durable storage; one hop less).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flowcraft_cloudflare._client import WorkerClient, WorkerError

__all__ = [
    "MAX_DELAY_SECONDS",
    "MAX_MESSAGE_BYTES",
    "DeadLetter",
    "Inbox",
    "InboxMessage",
    "InboxStats",
]

MAX_MESSAGE_BYTES = 128_000
"""Cloudflare Queues' limit on one message: 128 KB of 1,000 bytes, counting the envelope
and about 100 bytes of Cloudflare's own metadata."""
MAX_DELAY_SECONDS = 12 * 3600
"""Cloudflare Queues' delay ceiling; hand-backs are clamped to it too."""
# {"i": ..., "b": ...} around the body (with the inbox name and JSON escapes of a small
# body), plus the ~100 bytes of metadata Cloudflare counts against the limit.
_ENVELOPE_BYTES = 64 + 100
_MAX_PULL = 100


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """A pulled message: ``lease`` proves this pull still holds it."""

    id: str
    body: str
    attempts: int
    """Deliveries so far, this one included (hand-backs are refunded)."""
    lease: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked message and why."""

    message_id: str
    body: str
    error: str
    attempts: int


@dataclass(frozen=True, slots=True)
class InboxStats:
    ready: int
    hidden: int
    dead: int


class Inbox:
    """One logical queue (``name``) on the companion Worker."""

    def __init__(self, client: WorkerClient, name: str, *, direct: bool = False) -> None:
        if not name:
            raise ValueError("the inbox needs a name")
        self.client = client
        self.name = name
        self.direct = direct

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, direct={self.direct})"

    async def _call(self, op: str, **fields: Any) -> dict[str, Any]:
        return await self.client.call(
            "inbox", {"inbox": self.name, "op": op, **fields}, label=f"inbox:{op}"
        )

    def check_size(self, body: str) -> None:
        size = len(body.encode("utf-8", "surrogatepass")) + len(self.name) + _ENVELOPE_BYTES
        if size > MAX_MESSAGE_BYTES:
            raise WorkerError(
                f"a message of {size} bytes is over Cloudflare Queues' {MAX_MESSAGE_BYTES}"
            )

    async def send(self, bodies: Sequence[str], *, delay_seconds: float = 0) -> None:
        """Send message bodies (one call; the Worker batches 100 a ``sendBatch``)."""
        if not bodies:
            return
        for body in bodies:
            self.check_size(body)
        delay = max(0.0, min(float(delay_seconds), MAX_DELAY_SECONDS))
        messages = [{"body": body, "delay": delay} for body in bodies]
        await self.client.call(
            "enqueue", {"inbox": self.name, "direct": self.direct, "messages": messages}
        )

    async def send_raw(self, raw: bytes) -> None:
        """Put bytes on the Cloudflare Queue as any producer would, with no envelope: the
        consumer files them in the Worker's ``DEFAULT_INBOX``."""
        await self.client.call("raw", raw)

    async def pull(
        self, max_messages: int, *, visibility_seconds: float, wait_seconds: float = 0
    ) -> list[InboxMessage]:
        """Up to ``max_messages`` (never more), each hidden ``visibility_seconds``; waits
        up to ``wait_seconds`` for one when none is ready."""
        if max_messages < 1:
            return []
        answer = await self._call(
            "pull",
            max=min(max_messages, _MAX_PULL),
            visibility=visibility_seconds,
            wait=wait_seconds,
        )
        return [
            InboxMessage(m["id"], m["body"], int(m["attempts"]), m["lease"])
            for m in answer["messages"]
        ]

    async def extend(self, messages: Sequence[InboxMessage], seconds: float) -> list[bool]:
        """Hide these messages ``seconds`` more (one call); False where the lease was lost."""
        if not messages:
            return []
        items = [{"id": m.id, "lease": m.lease, "seconds": seconds} for m in messages]
        answer = await self._call("extend", items=items)
        return [bool(ok) for ok in answer["ok"]]

    async def ack(
        self,
        messages: Sequence[InboxMessage],
        *,
        riders: Mapping[str, list[dict[str, Any]]] | None = None,
    ) -> int:
        """Remove these messages for good (one call); returns how many were still held.
        ``riders``: ops for run objects (by name) the Worker runs after the ack, in the
        same call (write-behind marks, whose loss is harmless)."""
        if not messages and not riders:
            return 0
        items = [{"id": m.id, "lease": m.lease} for m in messages]
        extra = {"riders": [[name, ops] for name, ops in riders.items()]} if riders else {}
        return int((await self._call("ack", items=items, **extra))["removed"])

    async def release(
        self, messages: Sequence[InboxMessage], delay_seconds: float, *, counted: bool = False
    ) -> int:
        """Deliver again after ``delay_seconds`` (at most 12 h). Not ``counted``: the
        delivery is refunded, so a hand-back does not use up an attempt."""
        if not messages:
            return 0
        delay = max(0.0, min(float(delay_seconds), MAX_DELAY_SECONDS))
        items = [
            {"id": m.id, "lease": m.lease, "delay": delay, "refund": not counted} for m in messages
        ]
        return int((await self._call("release", items=items))["released"])

    async def dead_letter(self, message: InboxMessage, reason: str) -> bool:
        """Park the message with ``reason`` and remove it from the queue."""
        items = [{"id": message.id, "lease": message.lease, "reason": reason}]
        return int((await self._call("dead", items=items))["parked"]) == 1

    async def park(self, message: InboxMessage, reason: str) -> None:
        """Keep a message pulled from elsewhere (the HTTP pull consumer) among this
        inbox's dead letters, with ``reason``."""
        item = {"id": message.id, "body": message.body, "reason": reason}
        await self._call("park", items=[{**item, "attempts": message.attempts}])

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        answer = await self._call("dead_letters", limit=limit)
        return [
            DeadLetter(row["id"], row["body"], row["reason"], int(row["attempts"]))
            for row in answer["letters"]
        ]

    async def requeue_dead(self, limit: int) -> int:
        """Move up to ``limit`` dead letters back among the messages (one atomic step)."""
        answer = await self._call("requeue_dead", limit=limit)
        return int(answer["requeued"])

    async def purge_dead(self, limit: int | None = None, ids: list[str] | None = None) -> int:
        """Delete the dead letters named by ``ids``, else up to ``limit`` (None: all)."""
        answer = await self._call("purge_dead", limit=limit, ids=ids)
        return int(answer["purged"])

    async def stats(self) -> InboxStats:
        answer = await self._call("stats")
        return InboxStats(int(answer["ready"]), int(answer["hidden"]), int(answer["dead"]))

    async def purge(self) -> None:
        """Forget every message and dead letter (tests, tools)."""
        await self._call("purge")


def envelope_json(inbox: str, body: str) -> str:
    """The envelope the Worker puts on the Cloudflare Queue (for tools that send directly)."""
    return json.dumps({"i": inbox, "b": body}, separators=(",", ":"))
