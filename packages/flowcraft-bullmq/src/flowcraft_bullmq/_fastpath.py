"""The fast path: the base protocol's per-job calls, fused into fewer Redis commands.

Through two hooks the base adapter declares for this (``admit`` and
``mark_followed_up``), without changing the protocol:

* **Fused admission.** ``admit`` runs one script that reads the job's first keys,
  derives the pending activation ``g``, reads the second batch and, exactly when the
  base would go on to take the lease (the run is this blueprint version, not final,
  ``g`` has a record and is not paused), takes the lease for the job's holder with
  ``SET NX PX``. All of it is one atomic step on the server, a schedule the base
  protocol allows (its reads and lease with no gap between).
* **Write-behind "done" marks.** The done mark only lets a duplicate skip a
  follow-up that is idempotent anyway; ``mark_followed_up`` buffers it and the next
  script this worker runs carries it (or it is flushed within 50 ms). Losing one
  (crash) only makes a duplicate redo the follow-up.

Both need the coordination store to be a ``RedisCoordinationStore`` on the
adapter's own Redis client, and a non-cluster Redis (the scripts touch keys of
several runs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowcraft.context import Guard, PatchOperation
from flowcraft.distributed import Admission
from flowcraft.distributed import keys as K
from flowcraft_bullmq.context import Mark, RedisContext, decode

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("flowcraft.bullmq")

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
local leased = -1
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
  if not final then
    if redis.call('SET', ARGV[8] .. g, ARGV[9], 'NX', 'PX', ARGV[10]) then
      leased = 1
    else
      leased = 0
    end
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
    if first_read != [K.META, K.STATUS, K.resolved(node_id)]:
        raise ValueError("unexpected first read")  # the base handler changed: see READ_LUA
    head, tail = K.activation_parts(node_id)
    return ReadPlan(
        first_read=tuple(first_read),
        resolved_field=K.resolved(node_id),
        activation_head=head,
        activation_tail=tail,
        waiting_field=K.waiting(node_id),
        guess_first=tuple(guess_first),
        guess_later=tuple(guess_later),
        expected_meta=expected_meta,
    )


async def fused_admission(
    script: AsyncScript,
    state_key: str,
    plan: ReadPlan,
    *,
    lease_stem: str,
    holder: str,
    lease_ttl_ms: int,
    marks: MarkBuffer,
) -> Admission:
    """One ``READ_LUA`` call: the base's ``admit`` as one atomic step (module docstring).
    Buffered marks ride along."""
    taken = marks.take()
    args: list[Any] = [
        K.META,
        K.STATUS,
        plan.resolved_field,
        plan.activation_head,
        plan.activation_tail,
        plan.waiting_field,
        plan.expected_meta,
        lease_stem,
        holder,
        lease_ttl_ms,
        len(plan.guess_first),
        len(plan.guess_later),
        len(taken),
        *plan.guess_first,
        *plan.guess_later,
    ]
    for _, value, px in taken:
        args += (value, px)
    try:
        reply = await script(keys=[state_key, *(m[0] for m in taken)], args=args)
    except BaseException:
        marks.put_back(taken)
        raise
    meta, status, resolved, generation, leased, *rest = reply
    generation = int(generation)
    state: dict[str, Any] = {}
    for name, raw in ((K.META, meta), (K.STATUS, status), (plan.resolved_field, resolved)):
        if raw is not None:
            state[name] = decode(raw)
    guess = plan.guess_first if generation == 1 else plan.guess_later
    second = (plan.activation(generation), plan.waiting_field, *guess)
    found = {k: decode(v) for k, v in zip(second, rest, strict=True) if v is not None}
    return Admission(state, found, _LEASED[int(leased)])


_LEASED: dict[int, bool | None] = {1: True, 0: False, -1: None}


class MarkingContext(RedisContext):
    """A run's context on a worker with the fast path: every patch script carries the
    buffered "done" marks."""

    __slots__ = ("_marks",)

    def __init__(self, client: Redis, key: str, *, marks: MarkBuffer, **options: Any) -> None:
        super().__init__(client, key, **options)
        self._marks = marks

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        marks = self._marks.take()
        try:
            return await self._run_patch(ops, marks, guard)
        except BaseException:
            self._marks.put_back(marks)
            raise
