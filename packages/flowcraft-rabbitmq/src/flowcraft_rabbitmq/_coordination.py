"""Fewer round trips per job: the lease beside the run, the admission in one statement,
the follow-up marks written behind.

Through the two hooks the base adapter has for this (``admit`` and
``mark_followed_up``, DISTRIBUTED.md), without changing the protocol:

* **Leases in PostgreSQL.** Activation leases live in an unlogged table beside the
  runs (:class:`PostgresLeases`, a full ``CoordinationStore``); :class:`LeaseRouting`
  sends the protocol's lease keys there and every other key (joins, latches, the final
  status, attempts) to the coordination store the adapter was given (Redis). The
  heartbeat, the release after a failed attempt and the admission thus all see one
  lease. Unlogged means no WAL: a server crash empties the table, which only forgets
  leases (they save work; every resolution is guarded).
* **One admission statement.** :func:`admission_args` and :func:`admission` turn the
  base's steps 2-4 (first read, second read of the pending activation, the lease when
  the job will run) into the ``_ADMIT`` statement of ``_store``: one round trip where
  the base sends two reads and a lease.
* **Follow-up marks written behind.** A mark only lets a duplicate skip a follow-up
  that is idempotent anyway: :class:`MarksBehind` collects them and writes them
  together every 50 ms (one Redis round trip), instead of one round trip per job. A
  crash loses at most those 50 ms of marks, which only makes a duplicate redo its
  follow-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from flowcraft.distributed import Admission, CoordinationStore, RedisCoordinationStore
from flowcraft.distributed import keys as K
from flowcraft.distributed.coordination import delete_keys, validate_ttl_seconds
from flowcraft.serializer import JsonSerializer
from flowcraft_rabbitmq._store import PostgresRunStore

__all__ = [
    "AdmissionPlan",
    "LeaseRouting",
    "MarksBehind",
    "PostgresLeases",
    "admission",
]

logger = logging.getLogger("flowcraft.rabbitmq.coordination")

_json = JsonSerializer()


def _bytes(text: str) -> bytes:
    """A key or value as the table keeps it (any text, NUL and lone surrogates too)."""
    return text.encode("utf-8", "surrogatepass")


class PostgresLeases:
    """A ``CoordinationStore`` on the runs' unlogged leases table (one statement per
    call; an expired row reads as absent, as in Redis). Expired rows are deleted by
    :meth:`purge_expired`, which workers call now and then."""

    def __init__(self, store: PostgresRunStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.store.names.leases})"

    async def increment(self, key: str, ttl_seconds: float) -> int:
        sql = self.store.sql.lease_increment
        seconds = validate_ttl_seconds(ttl_seconds)
        return int(await self.store.lease_call("lease", "fetchval", sql, _bytes(key), seconds))

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        sql = self.store.sql.lease_set_nx
        seconds = validate_ttl_seconds(ttl_seconds)
        taken = await self.store.lease_call(
            "lease", "fetchval", sql, _bytes(key), _bytes(value), seconds
        )
        return taken is not None

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        sql = self.store.sql.lease_extend
        seconds = validate_ttl_seconds(ttl_seconds)
        extended = await self.store.lease_call("lease", "fetchval", sql, _bytes(key), seconds)
        return extended is not None

    async def delete(self, key: str) -> None:
        await self.store.lease_call("lease", "execute", self.store.sql.lease_delete, _bytes(key))

    async def get(self, key: str) -> str | None:
        sql = self.store.sql.lease_get
        value = await self.store.lease_call("lease", "fetchval", sql, _bytes(key))
        return None if value is None else bytes(value).decode("utf-8", "surrogatepass")

    async def purge_expired(self) -> int:
        """Delete expired rows; returns how many."""
        status = await self.store.lease_call("purge", "execute", self.store.sql.lease_purge)
        return int(str(status).rsplit(" ", 1)[-1])


class LeaseRouting:
    """The adapter's coordination store: lease keys (``<prefix>lease:...``) go to
    ``leases``, every other key to ``inner``."""

    def __init__(self, inner: CoordinationStore, leases: PostgresLeases, key_prefix: str) -> None:
        self.inner = inner
        self.leases = leases
        self._lease_prefix = f"{key_prefix}lease:"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(inner={self.inner!r}, leases={self.leases!r})"

    def _for(self, key: str) -> CoordinationStore:
        return self.leases if key.startswith(self._lease_prefix) else self.inner

    async def increment(self, key: str, ttl_seconds: float) -> int:
        return await self._for(key).increment(key, ttl_seconds)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        return await self._for(key).set_if_not_exist(key, value, ttl_seconds)

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        return await self._for(key).extend_ttl(key, ttl_seconds)

    async def delete(self, key: str) -> None:
        await self._for(key).delete(key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        leases = [key for key in keys if key.startswith(self._lease_prefix)]
        others = [key for key in keys if not key.startswith(self._lease_prefix)]
        await delete_keys(self.leases, leases)
        await delete_keys(self.inner, others)

    async def get(self, key: str) -> str | None:
        return await self._for(key).get(key)


# ---------------------------------------------------------------------- admission


@dataclass(frozen=True, slots=True)
class AdmissionPlan:
    """The fixed parameters of one node's admission statement (computed once per
    blueprint version and node)."""

    first_read: tuple[str, str, str]
    """meta, status and the node's resolved count: the base's first read, in order."""
    activation_head: str
    activation_tail: str
    waiting: str
    guess_first: tuple[str, ...]
    guess_later: tuple[str, ...]
    expected_meta: str
    """The run's meta for this blueprint version, as JSON (compared as jsonb)."""

    def activation(self, generation: int) -> str:
        return f"{self.activation_head}{generation}{self.activation_tail}"


def admission_plan(
    first_read: Sequence[str],
    node_id: str,
    blueprint_id: str,
    version: Any,
    guess_first: Sequence[str],
    guess_later: Sequence[str],
) -> AdmissionPlan | None:
    """The plan for a node, or None when the base's first read is not the one the
    statement knows (then the base's own admission runs)."""
    if list(first_read) != [K.META, K.STATUS, K.resolved(node_id)]:
        return None
    head, tail = K.activation_parts(node_id)
    return AdmissionPlan(
        first_read=(K.META, K.STATUS, K.resolved(node_id)),
        activation_head=head,
        activation_tail=tail,
        waiting=K.waiting(node_id),
        guess_first=tuple(guess_first),
        guess_later=tuple(guess_later),
        expected_meta=json.dumps({"blueprintId": blueprint_id, "version": version}),
    )


async def admission(
    store: PostgresRunStore,
    run_id: str,
    plan: AdmissionPlan,
    *,
    lease_stem: str,
    holder: str,
    lease_seconds: float,
) -> Admission:
    """The base's ``admit`` as one ``_ADMIT`` statement (module docstring)."""
    meta, status, resolved = plan.first_read
    args = (
        meta,
        status,
        resolved,
        plan.activation_head,
        plan.activation_tail,
        plan.waiting,
        list(plan.guess_first),
        list(plan.guess_later),
        plan.expected_meta,
        _bytes(lease_stem),
        _bytes(holder),
        float(lease_seconds),
    )
    row = await store.admit(run_id, args)
    if row is None:
        return Admission({})  # no such run: the handler dead-letters the job
    loads = _json.loads
    state: dict[str, Any] = {}
    for key, text in zip(plan.first_read, row[:3], strict=True):
        if text is not None:
            state[key] = loads(text)
    generation = row[3]
    if generation is None:
        return Admission(state)  # an odd resolved count: the handler reads by itself
    guess = plan.guess_first if generation == 1 else plan.guess_later
    found: dict[str, Any] = {}
    texts = (row[4], row[5], *row[6])
    for key, text in zip((plan.activation(generation), plan.waiting, *guess), texts, strict=True):
        if text is not None:
            found[key] = loads(text)
    return Admission(state, found, row[7])


# ---------------------------------------------------------------------- marks


Mark = tuple[str, float]
"""A follow-up mark: its coordination key and TTL (seconds)."""


class MarksBehind:
    """Follow-up marks (``set_if_not_exist(key, "1", ttl)``), written together every
    ``interval`` seconds: one round trip on a ``RedisCoordinationStore``, else the
    store's calls all at once. :meth:`flush` writes what is left (on close)."""

    def __init__(self, store: CoordinationStore, interval: float = 0.05) -> None:
        self._store = store
        self._interval = interval
        self._pending: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        """Marks written so far; ``batches`` the round trips that wrote them."""
        self.batches = 0

    def add(self, key: str, ttl_seconds: float) -> None:
        self._pending[key] = ttl_seconds
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(self._interval)  # gather the marks of a few ms
                await self._write_pending()
        finally:
            self._task = None

    async def _write_pending(self) -> None:
        marks, self._pending = list(self._pending.items()), {}
        if not marks:
            return
        try:
            await _write_marks(self._store, marks)
            self.written += len(marks)
            self.batches += 1
        except Exception as exc:
            # A lost mark only makes a duplicate job redo an idempotent follow-up.
            logger.warning("could not write %d follow-up marks: %r", len(marks), exc)

    async def flush(self) -> None:
        """Write every pending mark now."""
        task = self._task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._write_pending()


async def _write_marks(store: CoordinationStore, marks: Sequence[Mark]) -> None:
    if isinstance(store, RedisCoordinationStore):
        await store.set_all_if_not_exist([(key, "1", ttl) for key, ttl in marks])
        return
    calls: list[Awaitable[bool]] = [store.set_if_not_exist(k, "1", ttl) for k, ttl in marks]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
