"""What ``flowcraft`` operators do to an SQS fleet besides running it: requeue or purge
the dead-letter queue, read the job queue's depth, list the active runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from flowcraft_sqs._messages import BATCH

if TYPE_CHECKING:
    from flowcraft_sqs.adapter import SqsAdapter


class Operations:
    """Mixed into :class:`~flowcraft_sqs.SqsAdapter` (the base's optional hooks)."""

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Move up to ``limit`` messages of the dead-letter queue back to the job queue:
        each is sent before it is deleted (a crash between duplicates it, never loses
        it)."""
        sqs = _me(self)
        url = await sqs.dead_letter_queue_url()
        moved = 0
        # all taken first: a letter sent back and parked again is not taken twice
        for message in [m async for m in _take(sqs, url, limit)]:
            await sqs.send_body(message["Body"])
            await sqs.clients.sqs_call(
                "delete_message", QueueUrl=url, ReceiptHandle=message["ReceiptHandle"]
            )
            moved += 1
        return moved

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Delete messages of the dead-letter queue (all that can be received now when
        ``limit`` is None), counting them (SQS's PurgeQueue says nothing of how many)."""
        sqs = _me(self)
        url = await sqs.dead_letter_queue_url()
        deleted = 0
        async for message in _take(sqs, url, limit):
            await sqs.clients.sqs_call(
                "delete_message", QueueUrl=url, ReceiptHandle=message["ReceiptHandle"]
            )
            deleted += 1
        return deleted

    async def queue_depth(self) -> int:
        """SQS's approximate count of visible and delayed messages on the job queue."""
        sqs = _me(self)
        response = await sqs.clients.sqs_call(
            "get_queue_attributes",
            QueueUrl=sqs.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesDelayed"],
        )
        found = response.get("Attributes", {})
        return int(found.get("ApproximateNumberOfMessages", 0)) + int(
            found.get("ApproximateNumberOfMessagesDelayed", 0)
        )

    async def active_runs(self, limit: int = 100) -> list[str]:
        """The sparse index of active runs (the reconciler's, read only)."""
        sqs = _me(self)
        # a cutoff a minute ahead: every run not ended, whatever the clocks say
        return await sqs.find_stalled_runs(-60.0, limit)


async def _take(
    adapter: SqsAdapter, url: str | None, limit: int | None
) -> AsyncIterator[dict[str, Any]]:
    """Receive messages of ``url`` (hidden for 60 s while handled) up to ``limit``."""
    if url is None:
        return
    taken = 0
    while limit is None or taken < limit:
        want = BATCH if limit is None else min(BATCH, limit - taken)
        response = await adapter.clients.sqs_call(
            "receive_message",
            QueueUrl=url,
            MaxNumberOfMessages=want,
            VisibilityTimeout=60,
            WaitTimeSeconds=0,
        )
        messages = response.get("Messages", [])
        if not messages:
            return
        for message in messages[:want]:
            taken += 1
            yield message


def _me(mixin: Operations) -> SqsAdapter:
    return cast("SqsAdapter", mixin)
