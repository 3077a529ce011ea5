"""``RedisContext``: a run's state as one Redis hash, one field per context key.

Values are JSON text, checked and encoded by the core (``encode_value``: UTF-8,
no NaN, nesting within ``MAX_DEPTH``) before anything is sent, so a value that
cannot be stored fails its own patch with a ``SerializationError`` naming the key.
Context keys travel only as command arguments (hash fields, ``ARGV``), never
inside script text, so any key, however hostile, round-trips exactly.

==========  =================================================================
``get``      ``HGET``
``get_many`` ``HMGET`` (one round trip)
``has``      ``HEXISTS``
``patch``    one ``EVALSHA``: check the guard (one ``HMGET`` of the guard
             fields, compared as JSON text), then ``HSET`` the sets and ``HDEL`` the
             deletes, ``PEXPIRE`` the hash (the state TTL) and, if the context
             keeps a progress index, ``ZADD``/``ZREM`` the run there. Atomic: a
             script runs alone on the server, so check and write are one step.
``to_dict``  ``HGETALL``
==========  =================================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from flowcraft.context import BaseAsyncContext, Guard, PatchOperation, check_guard
from flowcraft.distributed import keys as K
from flowcraft.serializer import JsonSerializer, check_key, encode_value

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisContext"]

_JSON = JsonSerializer()
_FINAL = frozenset({"completed", "failed", "cancelled"})
_CHUNK = 1000  # arguments per HSET/HDEL inside the script (Lua's unpack limit is ~8000)

# KEYS[1] the run's hash, KEYS[2] the progress index (or any key when unused),
# KEYS[3..] keys of write-behind marks.
# ARGV[1] TTL ms of the hash (0: none), ARGV[2] fields set, ARGV[3] fields deleted,
# ARGV[4] index op (0 none, 1 touch, 2 remove), ARGV[5] index member, ARGV[6] score,
# ARGV[7] number of marks, ARGV[8] number of guards, then 2 * guards (field, expected
# JSON text, or '' for "absent"), 2 * sets (field, value), the deleted fields, and
# 2 * marks (value, TTL ms). Returns 1 if applied, 0 if the guard failed (then only
# the marks, which belong to other jobs, are written).
PATCH_LUA = """
local h = KEYS[1]
local nset = tonumber(ARGV[2])
local ndel = tonumber(ARGV[3])
local nmark = tonumber(ARGV[7])
local nguard = tonumber(ARGV[8])
local i = 9
local ok = 1
local glast = 8 + 2 * nguard
if nguard > 0 then
  local fields = {}
  for g = 1, nguard do fields[g] = ARGV[7 + 2 * g] end
  local cur = redis.call('HMGET', h, unpack(fields))
  for g = 1, nguard do
    local want = ARGV[8 + 2 * g]
    if want == '' then
      if cur[g] then ok = 0 end
    elseif cur[g] ~= want then
      ok = 0
    end
  end
end
i = glast + 1
local last = glast + 2 * nset
if ok == 0 then
  i = last + ndel + 1
end
while ok == 1 and i <= last do
  local j = math.min(i + 999, last)
  redis.call('HSET', h, unpack(ARGV, i, j))
  i = j + 1
end
last = last + ndel
while ok == 1 and i <= last do
  local j = math.min(i + 999, last)
  redis.call('HDEL', h, unpack(ARGV, i, j))
  i = j + 1
end
if ok == 1 then
  local ttl = tonumber(ARGV[1])
  if ttl > 0 then
    redis.call('PEXPIRE', h, ttl)
  end
  if ARGV[4] == '1' then
    redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
  elseif ARGV[4] == '2' then
    redis.call('ZREM', KEYS[2], ARGV[5])
  end
end
for m = 1, nmark do
  redis.call('SET', KEYS[2 + m], ARGV[i], 'NX', 'PX', ARGV[i + 1])
  i = i + 2
end
return ok
"""


def ttl_ms(seconds: float | None) -> int:
    """Milliseconds, rounded up; 0 means no TTL."""
    if seconds is None:
        return 0
    return max(1, math.ceil(seconds * 1000))


def encode(value: Any) -> str:
    """A value as JSON text, exactly as ``flowcraft.JsonSerializer.dumps`` writes it."""
    return _JSON.dumps(value)


def decode(raw: bytes | str | None) -> Any:
    """JSON text from Redis (bytes or str) as a value; None for a missing field."""
    if raw is None:
        return None
    return _JSON.loads(raw)


Mark = tuple[str, str, int]
"""A write-behind ``SET key value NX PX ms`` carried by a later script."""


class RedisContext(BaseAsyncContext):
    """One run's state in the Redis hash ``key``.

    Args:
        client: a ``redis.asyncio.Redis`` (either ``decode_responses`` setting).
        key: the hash holding the run's state.
        ttl_seconds: the hash expires this long after its last ``patch`` (None: never).
        index_key: a sorted set of running runs scored by the time of their last
            patch; ``index_member`` is this run's member. A patch that sets the
            reserved status key to a final or awaiting status removes the run.
    """

    __slots__ = ("_client", "_index_key", "_index_member", "_patch", "_ttl_ms", "key")

    def __init__(
        self,
        client: Redis,
        key: str,
        *,
        ttl_seconds: float | None = None,
        index_key: str | None = None,
        index_member: str | None = None,
        patch_script: AsyncScript | None = None,
    ) -> None:
        self._client = client
        self.key = key
        self._ttl_ms = ttl_ms(ttl_seconds)
        self._index_key = index_key
        self._index_member = index_member
        self._patch = patch_script or client.register_script(PATCH_LUA)

    async def get(self, key: str) -> Any:
        return decode(await self._client.hget(self.key, key))

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        values = await self._client.hmget(self.key, list(keys))
        return {k: decode(v) for k, v in zip(keys, values, strict=True) if v is not None}

    async def has(self, key: str) -> bool:
        return bool(await self._client.hexists(self.key, key))

    async def to_dict(self) -> dict[str, Any]:
        raw: dict[Any, Any] = await self._client.hgetall(self.key)
        return {
            (k.decode("utf-8") if isinstance(k, bytes) else k): decode(v) for k, v in raw.items()
        }

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        return await self._run_patch(ops, [], guard)

    async def _run_patch(
        self, ops: Sequence[PatchOperation], marks: Sequence[Mark], guard: Guard | None = None
    ) -> bool:
        # Later operations on a key win, as if applied in order.
        final: dict[str, PatchOperation] = {}
        for op in ops:
            final.pop(op.key, None)
            final[op.key] = op
        # Every value is encoded (and refused, naming its key) before anything is sent.
        sets: list[str] = []
        deletes: list[str] = []
        for op in final.values():
            if op.op == "set":
                sets += (op.key, encode_value(op.key, op.value))
            else:
                check_key(op.key)
                deletes.append(op.key)
        index_op = "0"
        if self._index_key is not None:
            index_op = "1"
            status = final.get(K.STATUS)
            if status is not None and status.op == "set":
                record = status.value if isinstance(status.value, dict) else {}
                if record.get("status") in _FINAL or record.get("status") == "awaiting":
                    index_op = "2"
        check_guard(guard)
        guards: list[str] = []
        for field, expected in (guard or {}).items():
            # Values are stored as canonical JSON text (``encode``): compare the text.
            guards += (field, "" if expected is None else encode(expected))
        args: list[Any] = [
            self._ttl_ms,
            len(sets) // 2,
            len(deletes),
            index_op,
            self._index_member or "",
            repr(time.time()),
            len(marks),
            len(guards) // 2,
            *guards,
            *sets,
            *deletes,
        ]
        for _, value, mark_ttl in marks:
            args += (value, mark_ttl)
        keys = [self.key, self._index_key or self.key, *(m[0] for m in marks)]
        return bool(int(await self._patch(keys=keys, args=args)))
