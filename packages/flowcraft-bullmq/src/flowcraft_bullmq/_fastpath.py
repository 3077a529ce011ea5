"""The fast path: the base protocol's per-job calls, fused into fewer Redis commands.

The base adapter (``flowcraft.distributed.adapter``) handles a job with, in order:
a batched read of ``meta``/``status``/``n.X``; a batched read of the activation
record, the wait mark and the likely input; ``SET NX`` of the lease; the commit
``patch``; the follow-up (enqueue successors); ``SET NX`` of the "done" mark.
Without changing that protocol, this module makes it cost fewer commands:

* **Fused read + lease.** The first read runs one script that reads the first
  three keys, derives the pending activation ``g``, reads the second batch and,
  exactly when the base would go on to take the lease (the run is this
  blueprint version, not final, ``g`` has a record and is not paused), takes the
  lease with ``SET NX PX``. The second read is answered from that snapshot and
  the base's ``set_if_not_exist`` of that very lease returns True without a
  round trip. All of it is one atomic step on the server, which is a schedule
  the base protocol already allows (its reads and lease with no gap between).
* **Write-behind "done" marks.** The done mark only lets a duplicate skip a
  follow-up that is idempotent anyway; it is buffered and carried by the next
  script this worker runs (or flushed within 50 ms). Losing one (crash) only
  makes a duplicate redo the follow-up.

Both need the coordination store to be a ``RedisCoordinationStore`` on the
adapter's own Redis client, and a non-cluster Redis (the scripts touch keys of
several runs).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flowcraft.context import Guard, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed.coordination import validate_ttl_seconds
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.redis import RedisCoordinationStore
from flowcraft_bullmq.context import Mark, RedisContext, decode, ttl_ms

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("flowcraft_bullmq")

_SENTINEL = "73519"  # a generation that marks where the number goes in a key format

# KEYS[1] the run's hash, KEYS[2..] write-behind mark keys.
# ARGV: 1 meta field, 2 status field, 3 n field, 4/5 activation field around g,
# 6 wait field, 7 expected meta JSON, 8 lease key without g, 9 lease value,
# 10 lease TTL ms, 11 guesses when g == 1, 12 guesses when g > 1, 13 marks,
# then the guesses, then 2 * marks (value, TTL ms).
READ_LUA = """
local h = KEYS[1]
local base = redis.call('HMGET', h, ARGV[1], ARGV[2], ARGV[3])
local g = 1
local numeric = true
if base[3] then
  local n = tonumber(base[3])
  if n then g = n + 1 else numeric = false end
end
local n1 = tonumber(ARGV[11])
local n2 = tonumber(ARGV[12])
local nmark = tonumber(ARGV[13])
local fields = {ARGV[4] .. g .. ARGV[5], ARGV[6]}
local from, count = 14, n1
if g > 1 then from, count = 14 + n1, n2 end
for k = from, from + count - 1 do fields[#fields + 1] = ARGV[k] end
local more = redis.call('HMGET', h, unpack(fields))
local leased = 0
if numeric and base[1] == ARGV[7] and more[1] and not more[2] then
  local final = false
  if base[2] then
    local ok, st = pcall(cjson.decode, base[2])
    if ok and type(st) == 'table' then
      local s = st['status']
      final = s == 'completed' or s == 'failed' or s == 'cancelled'
    else
      final = true
    end
  end
  if not final and redis.call('SET', ARGV[8] .. g, ARGV[9], 'NX', 'PX', ARGV[10]) then
    leased = 1
  end
end
local i = 14 + n1 + n2
for m = 1, nmark do
  redis.call('SET', KEYS[1 + m], ARGV[i], 'NX', 'PX', ARGV[i + 1])
  i = i + 2
end
local out = {base[1], base[2], base[3], g, leased}
for k = 1, #fields do out[#out + 1] = more[k] end
return out
"""


class MarkBuffer:
    """Write-behind ``SET NX PX`` marks, carried by the next script or flushed."""

    def __init__(self) -> None:
        self.active = False
        self._marks: list[Mark] = []
        self._event = asyncio.Event()

    def add(self, mark: Mark) -> None:
        self._marks.append(mark)
        self._event.set()

    def take(self, limit: int = 64) -> list[Mark]:
        if not self._marks:
            return []
        out = self._marks[:limit]
        del self._marks[:limit]
        return out

    def put_back(self, marks: Sequence[Mark]) -> None:
        self._marks[:0] = marks
        if marks:
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    async def flush(self, client: Redis) -> None:
        """Write every buffered mark now (one pipelined round trip)."""
        while marks := self.take(500):
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for key, value, px in marks:
                        pipe.set(key, value, nx=True, px=px)
                    await pipe.execute()
            except Exception:
                # A lost mark only makes a duplicate job redo an idempotent follow-up.
                logger.warning("could not write %d follow-up marks", len(marks), exc_info=True)


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """What the fused read of one node's job needs, computed once per blueprint node."""

    first_read: tuple[str, ...]
    """The base handler's first read of a job of this node (meta, status, resolved)."""
    resolved_field: str
    activation_head: str
    activation_tail: str
    waiting_field: str
    guess_first: tuple[str, ...]
    guess_later: tuple[str, ...]
    expected_meta: str

    def activation(self, generation: int) -> str:
        return f"{self.activation_head}{generation}{self.activation_tail}"


def make_read_plan(
    first_read: list[str],
    node_id: str,
    expected_meta: str,
    guess_first: list[str],
    guess_later: list[str],
) -> ReadPlan:
    head, found, tail = K.activation(node_id, int(_SENTINEL)).partition(_SENTINEL)
    if first_read != [K.META, K.STATUS, K.resolved(node_id)]:
        raise ValueError("unexpected first read")  # the base handler changed: see READ_LUA
    plan = ReadPlan(
        first_read=tuple(first_read),
        resolved_field=K.resolved(node_id),
        activation_head=head,
        activation_tail=tail,
        waiting_field=K.waiting(node_id),
        guess_first=tuple(guess_first),
        guess_later=tuple(guess_later),
        expected_meta=expected_meta,
    )
    if not found or plan.activation(2) != K.activation(node_id, 2):
        raise ValueError("unexpected activation key format")  # keys.py changed
    return plan


@dataclass(slots=True)
class JobScope:
    """The job a worker task is handling (a context variable per job task)."""

    payload: JobPayload
    plan: ReadPlan | None
    lease_stem: str = ""
    """The base's lease key for this job's node, without the generation."""
    redis_lease_stem: str = ""
    """The same in Redis (with the coordination store's own prefix)."""
    leases: set[str] = field(default_factory=set)
    """Lease keys the fused read took for this job (the base's names)."""
    lease_value: str = field(default_factory=lambda: uuid.uuid4().hex)
    """The value the fused read stores in a lease it takes (unique to this job)."""
    holders: dict[str, str] = field(default_factory=dict)
    """Lease key -> the holder the base named when it claimed a lease the fused read
    took: ``get`` of that key answers with it while the lease is this job's, so the
    base's "is it still mine?" checks work as with a plain ``SET NX``."""

    def lease_key(self, generation: int) -> str:
        return f"{self.lease_stem}{generation}"


CURRENT_JOB: contextvars.ContextVar[JobScope | None] = contextvars.ContextVar(
    "flowcraft_bullmq_job", default=None
)


def lease_stem(key_prefix: str, run_id: str, node_id: str) -> str:
    """The base's lease key of a node activation without the generation at its end."""
    sample = K.lease(key_prefix, run_id, node_id, int(_SENTINEL))
    stem, found, rest = sample.rpartition(_SENTINEL)
    if not found or rest:
        raise ValueError("unexpected lease key format")  # keys.py changed
    return stem


class JobContext(RedisContext):
    """The run's context inside a job: the fused first read, the snapshot second
    read and write-behind marks on every script it runs."""

    __slots__ = ("_lease_ttl", "_marks", "_prefetch", "_read", "_scope", "_worker_id")

    def __init__(
        self,
        client: Redis,
        key: str,
        *,
        scope: JobScope,
        read_script: AsyncScript,
        marks: MarkBuffer,
        worker_id: str,
        lease_seconds: float,
        **options: Any,
    ) -> None:
        super().__init__(client, key, **options)
        self._scope = scope
        self._read = read_script
        self._marks = marks
        self._worker_id = worker_id
        self._lease_ttl = ttl_ms(lease_seconds)
        self._prefetch: tuple[tuple[str, ...], dict[str, Any]] | None = None

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None and tuple(keys) == prefetch[0]:
            return prefetch[1]
        plan = self._scope.plan
        if plan is not None and tuple(keys) == plan.first_read:
            return await self._fused_read(plan)
        return await super().get_many(keys)

    async def _fused_read(self, plan: ReadPlan) -> dict[str, Any]:
        marks = self._marks.take()
        args: list[Any] = [
            K.META,
            K.STATUS,
            plan.resolved_field,
            plan.activation_head,
            plan.activation_tail,
            plan.waiting_field,
            plan.expected_meta,
            self._scope.redis_lease_stem,
            self._scope.lease_value,
            self._lease_ttl,
            len(plan.guess_first),
            len(plan.guess_later),
            len(marks),
            *plan.guess_first,
            *plan.guess_later,
        ]
        for _, value, px in marks:
            args += (value, px)
        try:
            reply = await self._read(keys=[self.key, *(m[0] for m in marks)], args=args)
        except BaseException:
            self._marks.put_back(marks)
            raise
        meta, status, resolved, generation, leased, *rest = reply
        generation = int(generation)
        found: dict[str, Any] = {}
        for name, raw in ((K.META, meta), (K.STATUS, status), (plan.resolved_field, resolved)):
            if raw is not None:
                found[name] = decode(raw)
        guess = plan.guess_first if generation == 1 else plan.guess_later
        second = (plan.activation(generation), plan.waiting_field, *guess)
        self._prefetch = (
            second,
            {k: decode(v) for k, v in zip(second, rest, strict=True) if v is not None},
        )
        if int(leased):
            self._scope.leases.add(self._scope.lease_key(generation))
        return found

    async def get(self, key: str) -> Any:
        self._prefetch = None
        return await super().get(key)

    async def has(self, key: str) -> bool:
        self._prefetch = None
        return await super().has(key)

    async def to_dict(self) -> dict[str, Any]:
        self._prefetch = None
        return await super().to_dict()

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        self._prefetch = None
        marks = self._marks.take()
        try:
            return await self._run_patch(ops, marks, guard)
        except BaseException:
            self._marks.put_back(marks)
            raise


class FastPathStore:
    """The coordination store the base sees: a ``RedisCoordinationStore`` whose
    ``set_if_not_exist`` knows leases the fused read already took and writes
    "done" marks behind."""

    def __init__(self, inner: RedisCoordinationStore, marks: MarkBuffer, done_stem: str) -> None:
        self.inner = inner
        self.marks = marks
        self.done_stem = done_stem

    @property
    def key_prefix(self) -> str:
        return self.inner.key_prefix

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        scope = CURRENT_JOB.get()
        if scope is not None and key in scope.leases:
            scope.leases.discard(key)
            scope.holders[key] = value
            return True
        if self.marks.active and key.startswith(self.done_stem):
            ttl = validate_ttl_seconds(ttl_seconds)
            self.marks.add((self.inner.key_prefix + key, value, ttl_ms(ttl)))
            return True
        return await self.inner.set_if_not_exist(key, value, ttl_seconds)

    async def increment(self, key: str, ttl_seconds: float) -> int:
        return await self.inner.increment(key, ttl_seconds)

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        return await self.inner.extend_ttl(key, ttl_seconds)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def get(self, key: str) -> str | None:
        value = await self.inner.get(key)
        scope = CURRENT_JOB.get()
        if scope is not None and value == scope.lease_value and key in scope.holders:
            return scope.holders[key]
        return value
