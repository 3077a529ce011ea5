"""What ``flowcraft`` operators do to a Pub/Sub fleet besides running it: requeue or
purge the dead-letter subscription, list the active runs. (Pub/Sub tells a
subscription's backlog only through Cloud Monitoring: no ``queue_depth``.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, cast

from google.api_core import exceptions as google_errors
from google.pubsub_v1.types import ReceivedMessage

if TYPE_CHECKING:
    from flowcraft_gcp.adapter import GcpAdapter


class Operations:
    """Mixed into :class:`~flowcraft_gcp.GcpAdapter` (the base's optional hooks)."""

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Publish up to ``limit`` parked jobs to the job topic again, then ack them off
        the dead-letter subscription (a crash between duplicates a job, never loses
        it). Its attributes (the reason) stay behind: the job starts afresh."""
        gcp = _me(self)
        # all taken first: a letter published again and parked again is not taken twice
        taken = [m async for batch in _take(gcp, limit) for m in batch]
        if taken:
            await gcp.queue.publish([bytes(m.message.data) for m in taken])
            await _ack(gcp, taken)
        return len(taken)

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Ack (delete) parked jobs: up to ``limit``, or all that can be pulled now."""
        gcp = _me(self)
        deleted = 0
        async for batch in _take(gcp, limit):
            await _ack(gcp, batch)
            deleted += len(batch)
        return deleted

    async def active_runs(self, limit: int = 100) -> list[str]:
        """Runs not ended, from the run documents (the reconciler's query, read only)."""
        # a cutoff a minute ahead: every running run, whatever the clocks say
        return await _me(self).runs.stalled(-60.0, limit)


async def _take(gcp: GcpAdapter, limit: int | None) -> AsyncIterator[Sequence[ReceivedMessage]]:
    queue = gcp.queue
    await queue.ensure()
    subscriber = queue.clients.subscriber()
    taken = 0
    while limit is None or taken < limit:
        want = 1000 if limit is None else min(1000, limit - taken)
        try:
            response = await subscriber.pull(
                subscription=queue.dead_letter_subscription_path,
                max_messages=want,
                timeout=queue.pull_timeout_seconds,
                retry=None,
            )
        except google_errors.DeadlineExceeded:
            return
        batch = list(response.received_messages)
        if not batch:
            return
        taken += len(batch)
        yield batch


async def _ack(gcp: GcpAdapter, batch: Sequence[ReceivedMessage]) -> None:
    await gcp.queue.clients.subscriber().acknowledge(
        subscription=gcp.queue.dead_letter_subscription_path,
        ack_ids=[m.ack_id for m in batch],
    )


def _me(mixin: Operations) -> GcpAdapter:
    return cast("GcpAdapter", mixin)
