"""Run state: the context a node reads and writes, and deltas for atomic commits.

A node never writes to the store directly: it writes through a
``TrackingContext`` that buffers its changes as ``PatchOperation`` deltas. The
runtime then commits the node's output and those deltas in one ``patch``, so a
crash can never leave one without the other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias, runtime_checkable

__all__ = [
    "AsyncContext",
    "BaseAsyncContext",
    "BatchReadContext",
    "Context",
    "Guard",
    "InMemoryContext",
    "PatchOperation",
    "TrackingContext",
    "check_guard",
    "guard_holds",
]

_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class PatchOperation:
    """One delta: set ``key`` to ``value``, or delete ``key``."""

    op: Literal["set", "delete"]
    key: str
    value: Any = None

    @classmethod
    def set(cls, key: str, value: Any) -> PatchOperation:
        return cls("set", key, value)

    @classmethod
    def delete(cls, key: str) -> PatchOperation:
        return cls("delete", key)

    def to_json_dict(self) -> dict[str, Any]:
        if self.op == "delete":
            return {"op": "delete", "key": self.key}
        return {"op": "set", "key": self.key, "value": self.value}


Guard: TypeAlias = Mapping[str, int | str | None]
"""``key -> expected`` for a guarded ``patch``: ``None`` means the key is absent."""


def check_guard(guard: Guard | None) -> None:
    """Refuse a guard whose values are not ``None``, ``int`` or ``str`` (a store
    compares them as JSON values; a bool, float or dict has no agreed comparison)."""
    if guard is None:
        return
    for key, expected in guard.items():
        if not isinstance(key, str):
            raise TypeError(f"guard keys are strings, not {type(key).__name__}")
        if expected is not None and (
            isinstance(expected, bool) or not isinstance(expected, int | str)
        ):
            raise TypeError(
                f"guard value of {key!r} must be None, int or str, not {type(expected).__name__}"
            )


def guard_holds(stored: Mapping[str, Any], guard: Guard) -> bool:
    """Whether ``guard`` holds over ``stored`` (the guard keys that exist, with their
    JSON values): ``None`` matches an absent key, an int only a JSON integer equal to
    it (never a bool or a float), a str only an equal JSON string."""
    for key, expected in guard.items():
        if key not in stored:
            if expected is not None:
                return False
            continue
        value = stored[key]
        if expected is None or type(value) is not type(expected) or value != expected:
            return False
    return True


@runtime_checkable
class AsyncContext(Protocol):
    """A run's shared state. ``patch`` must apply all of its operations atomically."""

    async def get(self, key: str) -> Any: ...
    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]: ...
    async def set(self, key: str, value: Any) -> None: ...
    async def has(self, key: str) -> bool: ...
    async def delete(self, key: str) -> None: ...
    async def to_dict(self) -> dict[str, Any]: ...
    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        """Apply ``ops`` atomically (all or nothing). With ``guard``: only if, for every
        ``key -> expected`` in it, the stored value of ``key`` equals ``expected``
        (``None``: the key is absent). Check and write are ONE atomic step in ONE round
        trip, natively in the store (Redis script, one SQL statement, DynamoDB
        ConditionExpression, Firestore precondition / single-document design, Cosmos
        filter predicate or etag, Cassandra LWT / conditional batch, a Durable Object's
        synchronous block). Returns False (writing nothing) when the guard fails, True
        otherwise (always True without a guard).

        Guard values are ``None``, ``int`` or ``str`` (see :func:`check_guard`) and
        compare as JSON values (:func:`guard_holds`); a guard key may also be written
        by ``ops``."""
        ...


class BaseAsyncContext(ABC):
    """Base for store-backed contexts: write ``get`` and ``patch``, override the rest for speed.

    ``get_many`` returns only the keys that exist; override it with one round trip
    (HMGET, a batched read) since the distributed adapter reads several keys per job.
    """

    @abstractmethod
    async def get(self, key: str) -> Any: ...

    @abstractmethod
    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        """See :meth:`AsyncContext.patch`: atomic, and guarded in the same step."""

    @abstractmethod
    async def to_dict(self) -> dict[str, Any]: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for key in keys:
            if await self.has(key):
                found[key] = await self.get(key)
        return found

    async def set(self, key: str, value: Any) -> None:
        await self.patch([PatchOperation("set", key, value)])

    async def delete(self, key: str) -> None:
        await self.patch([PatchOperation("delete", key)])

    async def has(self, key: str) -> bool:
        return await self.get(key) is not None


class BatchReadContext(BaseAsyncContext):
    """Base for stores whose natural read is a batch of keys: write ``get_many`` (one
    round trip), ``patch`` and ``to_dict``; ``get`` and ``has`` read one key with it."""

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]: ...

    async def get(self, key: str) -> Any:
        return (await self.get_many([key])).get(key)

    async def has(self, key: str) -> bool:
        return key in await self.get_many([key])


class Context:
    """The synchronous in-memory context: a dict with the context vocabulary."""

    __slots__ = ("_data",)

    def __init__(self, initial: Mapping[str, Any] | None = None) -> None:
        self._data: dict[str, Any] = dict(initial or {})

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._data[key] = value

    def has(self, key: str) -> bool:
        return key in self._data

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def apply(self, ops: Iterable[PatchOperation]) -> None:
        data = self._data
        for op in ops:
            if op.op == "set":
                data[op.key] = op.value
            else:
                data.pop(op.key, None)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._data)

    @property
    def data(self) -> dict[str, Any]:
        """The live dict (no copy): for the runtime's hot path."""
        return self._data


class InMemoryContext(BaseAsyncContext):
    """The asynchronous in-memory context, over a ``Context``."""

    __slots__ = ("sync",)

    def __init__(self, initial: Mapping[str, Any] | Context | None = None) -> None:
        self.sync = initial if isinstance(initial, Context) else Context(initial)

    async def get(self, key: str) -> Any:
        return self.sync.data.get(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        data = self.sync.data
        return {k: data[k] for k in keys if k in data}

    async def set(self, key: str, value: Any) -> None:
        self.sync.data[key] = value

    async def has(self, key: str) -> bool:
        return key in self.sync.data

    async def delete(self, key: str) -> None:
        self.sync.data.pop(key, None)

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        check_guard(guard)
        if guard and not guard_holds(self.sync.data, guard):
            return False
        self.sync.apply(ops)
        return True

    async def to_dict(self) -> dict[str, Any]:
        return self.sync.to_dict()


class TrackingContext(BaseAsyncContext):
    """Buffers a node's writes as deltas over an inner context.

    Reads see the node's own pending writes first. Nothing reaches the inner
    context until the runtime commits ``ops`` (with the node's output) in one patch.
    With ``node_ids``, ``get`` of an absent key that is a node id reads that node's
    output (``_outputs.<id>``), as ``context.get('a')`` does in the TypeScript flowcraft.
    """

    __slots__ = ("_inner", "_node_ids", "_pending")

    def __init__(self, inner: AsyncContext, node_ids: frozenset[str] | None = None) -> None:
        self._inner = inner
        self._pending: dict[str, Any] = {}
        self._node_ids = node_ids

    @property
    def ops(self) -> list[PatchOperation]:
        return [
            PatchOperation("delete", k) if v is _MISSING else PatchOperation("set", k, v)
            for k, v in self._pending.items()
        ]

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    def discard(self) -> None:
        """Forget pending writes (a failed attempt must not leak into the next one)."""
        self._pending.clear()

    async def get(self, key: str) -> Any:
        value = self._pending.get(key, _MISSING)
        if value is _MISSING:
            if key in self._pending:
                return None
            value = await self._inner.get(key)
            if value is None and self._node_ids is not None and key in self._node_ids:
                return await self.get("_outputs." + key)
        return value

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        missing = [k for k in keys if k not in self._pending]
        found = await self._inner.get_many(missing) if missing else {}
        for k in keys:
            if k in self._pending and self._pending[k] is not _MISSING:
                found[k] = self._pending[k]
        return found

    async def has(self, key: str) -> bool:
        if key in self._pending:
            return self._pending[key] is not _MISSING
        return await self._inner.has(key)

    async def set(self, key: str, value: Any) -> None:
        self._pending[key] = value

    async def delete(self, key: str) -> None:
        self._pending[key] = _MISSING

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        """Buffer ``ops``; a guard is checked against this view (pending writes first)."""
        check_guard(guard)
        if guard and not guard_holds(await self.get_many(list(guard)), guard):
            return False
        for op in ops:
            self._pending[op.key] = op.value if op.op == "set" else _MISSING
        return True

    async def to_dict(self) -> dict[str, Any]:
        data = await self._inner.to_dict()
        for k, v in self._pending.items():
            if v is _MISSING:
                data.pop(k, None)
            else:
                data[k] = v
        return data
