"""A run's context over a store that keeps every run: the thin wrapper adapters need.

Stores such as a PostgreSQL table or a Cassandra table hold all runs and take the
run id with each call; :class:`RunStoreContext` is the ``BaseAsyncContext`` of one
run on such a store, written once here instead of in each adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from flowcraft.context import BaseAsyncContext, Guard, PatchOperation

__all__ = ["RunStore", "RunStoreContext"]


class RunStore(Protocol):
    """The calls :class:`RunStoreContext` makes: each takes the run id first."""

    async def get(self, run_id: str, key: str) -> Any: ...

    async def get_many(self, run_id: str, keys: Sequence[str]) -> dict[str, Any]: ...

    async def patch(
        self, run_id: str, ops: Sequence[PatchOperation], guard: Guard | None = None
    ) -> bool: ...

    async def to_dict(self, run_id: str) -> dict[str, Any]: ...


S = TypeVar("S", bound=RunStore)


class RunStoreContext(BaseAsyncContext, Generic[S]):
    """The state of run ``run_id`` in ``store``."""

    __slots__ = ("run_id", "store")

    def __init__(self, store: S, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, store={self.store!r})"

    async def get(self, key: str) -> Any:
        return await self.store.get(self.run_id, key)

    async def has(self, key: str) -> bool:
        return key in await self.store.get_many(self.run_id, [key])

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return await self.store.get_many(self.run_id, keys)

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        return await self.store.patch(self.run_id, ops, guard)

    async def to_dict(self) -> dict[str, Any]:
        return await self.store.to_dict(self.run_id)
