"""What ``flowcraft`` operators do to a RabbitMQ fleet besides running it: requeue or
purge the dead-letter queue, read the depth of the work and delay queues, and list
the active runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from pamqp import commands as amqp

from flowcraft.distributed import keys as K
from flowcraft_rabbitmq._amqp import Message

if TYPE_CHECKING:
    from flowcraft_rabbitmq.adapter import RabbitMQAdapter

# Read only (the reconciler's claim writes reconciled_at; this does not), on the
# partial index of unfinished runs (updated_at WHERE result IS NULL). ``{runs}`` is
# the validated, quoted table name; the status key and the limit are parameters.
_ACTIVE_RUNS = (
    "SELECT run_id FROM {runs} WHERE result IS NULL "
    "AND coalesce((state ->> $1)::jsonb ->> 'status', '') <> 'awaiting' "
    "ORDER BY updated_at LIMIT $2"
)


class Operations:
    """Mixed into :class:`~flowcraft_rabbitmq.RabbitMQAdapter` (the base's optional hooks)."""

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Move up to ``limit`` dead letters back to the work queue: each is published
        (and confirmed) before it is acked off the dead-letter queue, so a crash
        between duplicates it but never loses it. Its headers are not carried over:
        the job starts afresh."""
        broker = _me(self).broker
        await broker.declare()
        moved = 0
        async with broker.channel() as channel:  # anything taken and not acked goes back
            # all taken first (held unacked): a letter parked again is not taken twice
            taken: list[Message] = []
            while len(taken) < limit:
                message = await channel.get(broker.topology.dead_queue)
                if message is None:
                    break
                taken.append(message)
            for message in taken:
                await broker.publish(message.body)
                await message.ack()
                moved += 1
        return moved

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        """Delete dead letters: up to ``limit``, or the whole queue (None)."""
        broker = _me(self).broker
        await broker.declare()
        deleted = 0
        async with broker.channel() as channel:
            if limit is None:
                ok = await channel.call(amqp.Queue.Purge(queue=broker.topology.dead_queue))
                return int(ok.message_count or 0)
            while deleted < limit:
                message = await channel.get(broker.topology.dead_queue)
                if message is None:
                    break
                await message.ack()
                deleted += 1
        return deleted

    async def queue_depth(self) -> int:
        """Messages ready in the work queue and waiting in the delay queues."""
        broker = _me(self).broker
        depths = await broker.depths()
        return sum(n for name, n in depths.items() if name != broker.topology.dead_queue)

    async def active_runs(self, limit: int = 100) -> list[str]:
        """Unfinished runs that do not wait for a resume, least recently changed first,
        from the runs table (``flowcraft runs``); claims and changes nothing."""
        store = _me(self).store
        pool = await store.pool()
        query = _ACTIVE_RUNS.format(runs=store.names.runs)
        rows = await pool.fetch(query, K.STATUS, int(limit))
        return [str(row[0]) for row in rows]


def _me(mixin: Operations) -> RabbitMQAdapter:
    return cast("RabbitMQAdapter", mixin)
