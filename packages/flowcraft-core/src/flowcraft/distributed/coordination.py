"""The coordination store contract, and the in-memory store that tests and simulations use.

Distributed adapters coordinate through five atomic key-value operations only
(fan-in join counters, run locks, job claims, heartbeats). Every backend store
implements :class:`CoordinationStore`; :mod:`flowcraft.testing` checks that it
behaves like :class:`InMemoryCoordinationStore`.

TTL semantics, shared by every store (they match Redis):

- ``ttl_seconds`` must be a finite number > 0; anything else raises ``ValueError``
  so no store can silently create a key that never expires.
- An expired key reads as absent everywhere: ``get`` returns ``None``,
  ``set_if_not_exist`` may take it, ``extend_ttl`` returns ``False`` and
  ``increment`` starts again from 0.
- ``increment`` sets the TTL only when it creates the counter (like ``INCR``,
  which keeps the existing TTL): a join counter expires a fixed time after its
  first increment, however many predecessors arrive later.
- ``set_if_not_exist`` that loses changes neither the value nor the TTL.
- ``extend_ttl`` sets the remaining lifetime to ``ttl_seconds`` from now (it does
  not add to it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "Clock",
    "CoordinationStore",
    "ICoordinationStore",
    "InMemoryCoordinationStore",
    "OpHook",
    "validate_ttl_seconds",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
"""Returns monotonic seconds; injectable so simulations control expiry."""

OpHook = Callable[[str, str], Awaitable[None]]
"""``hook(operation_name, key)``; raising from it simulates a crash or a lost reply."""


@runtime_checkable
class CoordinationStore(Protocol):
    """An atomic, shared key-value store with TTLs: all a distributed adapter may rely on."""

    async def increment(self, key: str, ttl_seconds: float) -> int:
        """Atomically add 1 to the counter at ``key`` and return the new value.

        A missing or expired counter starts from 0 and gets ``ttl_seconds``; an
        existing counter keeps its TTL.
        """
        ...

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        """Set ``key`` to ``value`` with ``ttl_seconds`` only if it is absent; True if set."""
        ...

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        """Make an existing key live ``ttl_seconds`` from now; False if it is absent."""
        ...

    async def delete(self, key: str) -> None:
        """Remove ``key``; removing an absent key is not an error."""
        ...

    async def get(self, key: str) -> str | None:
        """Return the value at ``key`` (counters as decimal text), or None if absent."""
        ...


ICoordinationStore = CoordinationStore
"""The seed document's name for :class:`CoordinationStore`."""


async def delete_keys(store: CoordinationStore, keys: Sequence[str]) -> None:
    """Delete ``keys``: in one call where the store has ``delete_many(keys)`` (an optional
    method: one round trip instead of one per key), else one by one."""
    many = getattr(store, "delete_many", None)
    if many is not None:
        await many(list(keys))
        return
    for key in keys:
        await store.delete(key)


def validate_ttl_seconds(ttl_seconds: float) -> float:
    """Return ``ttl_seconds`` as a float, refusing values that would mean "never expire"."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise ValueError(f"ttl_seconds must be a number, got {type(ttl_seconds).__name__}")
    ttl = float(ttl_seconds)
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"ttl_seconds must be a finite number > 0, got {ttl_seconds!r}")
    return ttl


@dataclass(slots=True)
class _Entry:
    value: str
    expires_at: float


class InMemoryCoordinationStore:
    """A :class:`CoordinationStore` in one process, for tests, simulations and the memory adapter.

    Each operation does its read-modify-write without awaiting, so it is atomic
    on an event loop; a lock also keeps it atomic across threads. Expired keys
    are dropped when touched and in periodic sweeps.

    Args:
        clock: monotonic seconds; pass a fake clock to move time in simulations.
        before_op: awaited as ``before_op(name, key)`` before each operation;
            raise from it to simulate a crash before the store is reached.
        after_op: awaited as ``after_op(name, key)`` after each operation took
            effect; raise from it to simulate a reply lost after the write.
    """

    _SWEEP_EVERY = 1024

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        before_op: OpHook | None = None,
        after_op: OpHook | None = None,
    ) -> None:
        self.clock = clock
        self.before_op = before_op
        self.after_op = after_op
        self.op_counts: Counter[str] = Counter()
        """Operations that reached the store, per method name (bounds store cost per job)."""
        self._data: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._writes_since_sweep = 0

    def reset_counts(self) -> None:
        """Forget the operation counts, e.g. before measuring one job."""
        self.op_counts.clear()

    async def increment(self, key: str, ttl_seconds: float) -> int:
        """See :meth:`CoordinationStore.increment`."""
        ttl = validate_ttl_seconds(ttl_seconds)
        await self._before("increment", key)
        with self._lock:
            now = self.clock()
            entry = self._live(key, now)
            if entry is None:
                entry = _Entry("0", now + ttl)
                self._data[key] = entry
            try:
                current = int(entry.value)
            except ValueError:
                raise ValueError(f"value at {key!r} is not an integer counter") from None
            entry.value = str(current + 1)
            self._wrote(now)
            result = current + 1
        await self._after("increment", key)
        return result

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        """See :meth:`CoordinationStore.set_if_not_exist`."""
        ttl = validate_ttl_seconds(ttl_seconds)
        await self._before("set_if_not_exist", key)
        with self._lock:
            now = self.clock()
            won = self._live(key, now) is None
            if won:
                self._data[key] = _Entry(value, now + ttl)
                self._wrote(now)
        await self._after("set_if_not_exist", key)
        return won

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        """See :meth:`CoordinationStore.extend_ttl`."""
        ttl = validate_ttl_seconds(ttl_seconds)
        await self._before("extend_ttl", key)
        with self._lock:
            now = self.clock()
            entry = self._live(key, now)
            if entry is not None:
                entry.expires_at = now + ttl
        await self._after("extend_ttl", key)
        return entry is not None

    async def delete(self, key: str) -> None:
        """See :meth:`CoordinationStore.delete`."""
        await self._before("delete", key)
        with self._lock:
            self._data.pop(key, None)
        await self._after("delete", key)

    async def get(self, key: str) -> str | None:
        """See :meth:`CoordinationStore.get`."""
        await self._before("get", key)
        with self._lock:
            entry = self._live(key, self.clock())
            value = None if entry is None else entry.value
        await self._after("get", key)
        return value

    def snapshot(self) -> dict[str, str]:
        """Live keys and values, without counting an operation (for test assertions)."""
        with self._lock:
            now = self.clock()
            return {k: e.value for k, e in self._data.items() if e.expires_at > now}

    def ttl_remaining(self, key: str) -> float | None:
        """Seconds until ``key`` expires, or None if absent (not counted as an operation)."""
        with self._lock:
            now = self.clock()
            entry = self._live(key, now)
            return None if entry is None else entry.expires_at - now

    async def _before(self, name: str, key: str) -> None:
        if self.before_op is not None:
            await self.before_op(name, key)
        self.op_counts[name] += 1

    async def _after(self, name: str, key: str) -> None:
        if self.after_op is not None:
            await self.after_op(name, key)

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expires_at <= now:
            del self._data[key]
            return None
        return entry

    def _wrote(self, now: float) -> None:
        # Amortised sweep so keys that are never touched again do not pile up.
        self._writes_since_sweep += 1
        if self._writes_since_sweep >= self._SWEEP_EVERY:
            self._writes_since_sweep = 0
            expired = [k for k, e in self._data.items() if e.expires_at <= now]
            for k in expired:
                del self._data[k]
            if expired:
                logger.debug("swept %d expired coordination keys", len(expired))
