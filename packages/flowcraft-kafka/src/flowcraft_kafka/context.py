"""``CassandraContext``: one run's state, a partition of rows (one per key) in Cassandra.

==============  ==============================================================
``get``         ``SELECT v ... WHERE ns, run, k``
``get_many``    ``SELECT k, v ... WHERE ns, run AND k IN ?`` (100 keys a request)
``patch``       one single-partition batch of upserts and deletes (O(delta));
                with ``guard``, the same batch as one lightweight transaction
``to_dict``     the run's partition, paged
==============  ==============================================================

See :mod:`flowcraft_kafka._cassandra` for why this layout, the timestamps and the
guarded patch's timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowcraft.context import BaseAsyncContext, Guard, PatchOperation
from flowcraft_kafka._cassandra import CassandraRunStore

__all__ = ["CassandraContext"]


class CassandraContext(BaseAsyncContext):
    """The state of run ``run_id`` in a :class:`CassandraRunStore`."""

    __slots__ = ("run_id", "store")

    def __init__(self, store: CassandraRunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, store={self.store!r})"

    async def get(self, key: str) -> Any:
        return await self.store.get(self.run_id, key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return await self.store.get_many(self.run_id, keys)

    async def patch(
        self,
        ops: Sequence[PatchOperation],
        *,
        guard: Guard | None = None,
    ) -> bool:
        return await self.store.patch(self.run_id, ops, guard)

    async def to_dict(self) -> dict[str, Any]:
        return await self.store.to_dict(self.run_id)
