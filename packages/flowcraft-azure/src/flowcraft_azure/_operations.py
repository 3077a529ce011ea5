"""What ``flowcraft`` operators do to an Azure fleet besides running it: requeue or purge
the poison queue, read the job queue's depth, list the active runs."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from flowcraft_azure._queue import MAX_RECEIVE

if TYPE_CHECKING:
    from flowcraft_azure.adapter import AzureAdapter

_HIDE_SECONDS = 60


class Operations:
    """Mixed into :class:`~flowcraft_azure.AzureAdapter` (the base's optional hooks)."""

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Move up to ``limit`` poison messages back to the job queue: each job's body
        is sent before its poison message is deleted (a crash between duplicates it,
        never loses it). A body cut to fit the poison queue's 64 KiB stays there."""
        azure = _me(self)
        moved = 0
        # all taken first: a letter sent back and parked again is not taken twice
        for message in [m async for m in _take(azure, limit)]:
            try:
                record: Any = json.loads(str(message.content))
                body, cut = str(record["body"]), bool(record.get("truncated"))
            except (ValueError, KeyError, TypeError):
                body, cut = str(message.content), False
            if cut:
                continue
            await azure.queue.send(body)
            await azure.queue.poison.delete_message(message)
            moved += 1
        return moved

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Delete poison messages (all that can be received now when ``limit`` is None)."""
        azure = _me(self)
        deleted = 0
        async for message in _take(azure, limit):
            await azure.queue.poison.delete_message(message)
            deleted += 1
        return deleted

    async def queue_depth(self) -> int:
        """The job queue's approximate message count (visible and delayed)."""
        properties = await _me(self).queue.queue.get_queue_properties()
        return int(properties.approximate_message_count or 0)

    async def active_runs(self, limit: int = 100) -> list[str]:
        """Running runs from the run store (the reconciler's query, read only)."""
        # a cutoff a minute ahead: every running run, whatever the clocks say
        return await _me(self).runs.stalled(-60.0, limit)


async def _take(azure: AzureAdapter, limit: int | None) -> Any:
    """Poison messages, hidden for a minute each while handled, up to ``limit``."""
    taken = 0
    while limit is None or taken < limit:
        want = MAX_RECEIVE if limit is None else min(MAX_RECEIVE, limit - taken)
        pages = azure.queue.poison.receive_messages(
            messages_per_page=want, max_messages=want, visibility_timeout=_HIDE_SECONDS
        )
        batch = [message async for message in pages]
        if not batch:
            return
        for message in batch:
            taken += 1
            yield message


def _me(mixin: Operations) -> AzureAdapter:
    return cast("AzureAdapter", mixin)
