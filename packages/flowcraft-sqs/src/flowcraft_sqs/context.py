"""``DynamoDbContext``: a run's state as ONE DynamoDB item, patched in one ``UpdateItem``.

Item layout (partition key ``pk = namespace/run/<run id>``):

=========  =====================================================================
``c:<k>``  context key ``k``, its value as JSON text (exact round trip)
``sz``     the bytes the ``c:`` attributes take (kept by every patch)
``x``      expiry, epoch milliseconds (``ttl``: the same in seconds, for DynamoDB)
``u``      last patch, epoch milliseconds (sort key of the active-runs index)
``g``      active-runs index partition, present only while the run has not ended
``st``     the run's status (running, awaiting, ...), projected into the index
``rid``    the run id, only when it is too long to be part of ``pk``
=========  =====================================================================

The run's published final result is as large as the state itself, so it lives in
its own item (``namespace/result/<run id>``, attribute ``r``, first write wins)
instead of doubling the run's item.

Keys never appear inside expression text: every attribute name goes through
``ExpressionAttributeNames`` (``#n0``, ``#n1``, ...) and every value through
``ExpressionAttributeValues``.

Size: DynamoDB refuses items over 400 KB with a terse error. Each patch carries a
condition ``sz <= limit - bytes it adds``; a patch that could cross the limit
takes a slow path that reads the item, computes the exact resulting size and
either raises :class:`~flowcraft.StateLimitError` or writes under an optimistic
check. Overwritten and removed values are returned by the same ``UpdateItem``
(``UPDATED_OLD``) and subtracted from ``sz`` by a second, small update.

A guarded patch adds the guard to the same ``ConditionExpression``
(``attribute_not_exists(#g)`` for "absent", ``#g = :g`` with the expected value's
JSON text otherwise: values are stored as canonical JSON text). A failed condition
does not say which part failed, so the slow path reads the item: if the guard does
not hold the patch is refused (False), else it is written under the guard and an
optimistic check on ``sz``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowcraft.context import BaseAsyncContext, Guard, PatchOperation, check_guard, guard_holds
from flowcraft.distributed import keys as K
from flowcraft.errors import StateLimitError
from flowcraft.serializer import JsonSerializer, Serializer, check_key, encode_value
from flowcraft_sqs._client import (
    AwsClients,
    error_code,
    is_conditional_failure,
    item_key,
    validate_namespace,
)

__all__ = ["DEFAULT_MAX_STATE_BYTES", "DynamoDbContext", "RunTable"]

DEFAULT_MAX_STATE_BYTES = 390_000
"""Context bytes a run may hold: under DynamoDB's 400 KB item limit (409,600 bytes;
moto's is 405,000), leaving room for the bookkeeping attributes and the key."""

ATTR_PREFIX = "c:"
_FINAL = frozenset({"completed", "failed", "cancelled"})
# DynamoDB's limit on one expression string (UpdateExpression, ProjectionExpression).
_MAX_EXPRESSION = 4096
_SLOW_PATH_TRIES = 8


def attr_size(name: str, value: Mapping[str, Any]) -> int:
    """An attribute's size as DynamoDB counts it (name + value), for string and number
    values; the ``c:`` attributes are always strings."""
    size = len(name.encode())
    if "S" in value:
        return size + len(str(value["S"]).encode())
    if "N" in value:
        return size + len(str(value["N"])) // 2 + 1
    return size + len(str(value))


@dataclass(frozen=True, slots=True)
class RunTable:
    """Where runs live: the clients, the table and the settings every run context shares."""

    clients: AwsClients
    table_name: str = "flowcraft"
    namespace: str = "flowcraft"
    state_ttl_seconds: float = 7 * 24 * 3600
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    index_shards: int = 4
    serializer: Serializer = field(default_factory=JsonSerializer)

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.index_shards < 1:
            raise ValueError("index_shards must be >= 1")
        if not 1024 <= self.max_state_bytes <= 400_000:
            raise ValueError("max_state_bytes must be between 1 KiB and 400,000 bytes")

    def run_key(self, run_id: str) -> str:
        return item_key(self.namespace, "run", run_id)

    def result_key(self, run_id: str) -> dict[str, Any]:
        return {"pk": {"S": item_key(self.namespace, "result", run_id)}}

    def expiry(self) -> dict[str, Any]:
        """``:x`` and ``:t`` expression values: ``state_ttl_seconds`` from now."""
        expires = _now_ms() + int(self.state_ttl_seconds * 1000)
        return {":x": {"N": str(expires)}, ":t": {"N": str(expires // 1000 + 1)}}

    async def write_result(self, run_id: str, result: Any) -> None:
        """Keep the FIRST final result of a run in its result item: one ``UpdateItem``
        (``if_not_exists``), so a repeated publication changes nothing."""
        try:
            await self.clients.dynamodb_call(
                "update_item",
                TableName=self.table_name,
                Key=self.result_key(run_id),
                UpdateExpression="SET #r = if_not_exists(#r, :r), #x = :x, #t = :t",
                ExpressionAttributeNames={"#r": "r", "#x": "x", "#t": "ttl"},
                ExpressionAttributeValues={
                    ":r": {"S": self.serializer.dumps(result)},
                    **self.expiry(),
                },
            )
        except Exception as exc:
            if error_code(exc) == "ValidationException" and "size" in str(exc).lower():
                raise StateLimitError(
                    f"run {run_id!r}: the final result does not fit in one DynamoDB item "
                    f"(400 KB): {exc}"
                ) from exc
            raise

    async def read_result(self, run_id: str) -> Any:
        """The published final result (as JSON data), or None."""
        response = await self.clients.dynamodb_call(
            "get_item", TableName=self.table_name, Key=self.result_key(run_id), ConsistentRead=True
        )
        item = response.get("Item")
        if not item or "r" not in item or int(item.get("x", {"N": "0"})["N"]) <= _now_ms():
            return None
        return self.serializer.loads(item["r"]["S"])

    def run_id_of(self, item: Mapping[str, Any]) -> str:
        """The run id of an item (or index entry) of this table's runs."""
        if "rid" in item:
            return str(item["rid"]["S"])
        return str(item["pk"]["S"])[len(f"{self.namespace}/run/") :]

    def index_partition(self, shard: int) -> str:
        return f"{self.namespace}/{shard}"

    def shard_of(self, run_id: str) -> int:
        return zlib.crc32(run_id.encode("utf-8", "surrogatepass")) % self.index_shards

    def context(self, run_id: str) -> DynamoDbContext:
        return DynamoDbContext(self, run_id)


class DynamoDbContext(BaseAsyncContext):
    """One run's state in DynamoDB. Create it with :meth:`RunTable.context` (or the
    adapter's ``create_context``)."""

    def __init__(self, table: RunTable, run_id: str) -> None:
        self.table = table
        self.run_id = run_id
        self._key = {"pk": {"S": table.run_key(run_id)}}
        self._long_id = table.run_key(run_id) != f"{table.namespace}/run/{run_id}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, table={self.table.table_name!r})"

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        return await self.table.clients.dynamodb_call(
            operation, TableName=self.table.table_name, **params
        )

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Any:
        return (await self.get_many([key])).get(key)

    async def has(self, key: str) -> bool:
        return key in await self.get_many([key])

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """Only the asked keys, in one strongly consistent ``GetItem`` (split only when
        the projection would pass DynamoDB's 4 KB expression limit)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        if not wanted:
            return found
        for chunk in _projection_chunks(wanted):
            names = {f"#n{i}": ATTR_PREFIX + k for i, k in enumerate(chunk)}
            names["#x"] = "x"
            response = await self._call(
                "get_item",
                Key=self._key,
                ConsistentRead=True,
                ProjectionExpression=",".join(names),
                ExpressionAttributeNames=names,
            )
            item = response.get("Item")
            if not item or self._expired(item):
                break
            found.update(self._decode(item))
        return found

    async def to_dict(self) -> dict[str, Any]:
        """The whole state (one ``GetItem``): only finalization and operators need it."""
        item = await self._read_item()
        return self._decode(item) if item else {}

    async def _read_item(self) -> dict[str, Any] | None:
        response = await self._call("get_item", Key=self._key, ConsistentRead=True)
        item: dict[str, Any] | None = response.get("Item")
        if item is None or self._expired(item):
            return None
        return item

    def _expired(self, item: Mapping[str, Any]) -> bool:
        expiry = item.get("x")
        return expiry is not None and int(expiry["N"]) <= _now_ms()

    def _decode(self, item: Mapping[str, Any]) -> dict[str, Any]:
        loads = self.table.serializer.loads
        return {
            name[len(ATTR_PREFIX) :]: loads(value["S"])
            for name, value in item.items()
            if name.startswith(ATTR_PREFIX)
        }

    # ------------------------------------------------------------------ the patch

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        """Apply every operation atomically in ONE ``UpdateItem`` (SET and REMOVE); with
        ``guard``, only if it holds (part of the same update's condition). True if
        applied, False if the guard failed (nothing written).

        Raises:
            StateLimitError: the run's state would pass ``max_state_bytes``, or the
                patch is too large for one DynamoDB expression.
            SerializationError: a key or value cannot be stored (not JSON, not valid
                Unicode, nested deeper than ``MAX_DEPTH``); it names the key.
        """
        check_guard(guard)
        plan = _Plan.build(self, ops)
        if not plan.sets and not plan.removes and not guard:
            return True
        now = _now_ms()
        budget = self.table.max_state_bytes - plan.added
        if budget < 0:
            raise self._limit_error(plan.added, "this patch alone")
        params = plan.update(now, size_clause=("ADD #sz :add", {":add": {"N": str(plan.added)}}))
        params["ConditionExpression"] = (
            "(attribute_not_exists(#sz) OR #sz <= :budget)"
            " AND (attribute_not_exists(#x) OR #x > :now)"
        ) + self._guard_condition(params, guard)
        params["ExpressionAttributeValues"][":budget"] = {"N": str(budget)}
        params["ExpressionAttributeValues"][":now"] = {"N": str(now)}
        try:
            response = await self._write(params, ReturnValues="UPDATED_OLD")
        except Exception as exc:
            if not is_conditional_failure(exc):
                raise
            return await self._patch_slow(plan, guard)
        freed = sum(
            attr_size(name, value)
            for name, value in response.get("Attributes", {}).items()
            if name.startswith(ATTR_PREFIX)
        )
        if freed:
            # Overwritten and removed values no longer count. Not atomic with the
            # patch: a crash in between only overstates the size (the slow path
            # recounts exactly when it matters).
            await self._call(
                "update_item",
                Key=self._key,
                UpdateExpression="ADD #sz :d",
                ExpressionAttributeNames={"#sz": "sz"},
                ExpressionAttributeValues={":d": {"N": str(-freed)}},
            )
        return True

    def _guard_condition(self, params: dict[str, Any], guard: Guard | None) -> str:
        """`` AND ...`` conditions of ``guard`` (names and values added to ``params``)."""
        if not guard:
            return ""
        names = params["ExpressionAttributeNames"]
        values = params["ExpressionAttributeValues"]
        dumps = self.table.serializer.dumps
        parts: list[str] = []
        for i, (key, expected) in enumerate(guard.items()):
            names[f"#g{i}"] = ATTR_PREFIX + key
            if expected is None:
                parts.append(f"attribute_not_exists(#g{i})")
            else:
                values[f":g{i}"] = {"S": dumps(expected)}
                parts.append(f"#g{i} = :g{i}")
        return " AND " + " AND ".join(parts)

    async def _patch_slow(self, plan: _Plan, guard: Guard | None = None) -> bool:
        """Near the size limit, on an expired item, or when a guard may have failed:
        read the item, refuse if the guard does not hold, else count exactly and write
        under the guard and an optimistic check on ``sz``."""
        for _ in range(_SLOW_PATH_TRIES):
            now = _now_ms()
            response = await self._call("get_item", Key=self._key, ConsistentRead=True)
            item = response.get("Item")
            if item is not None and self._expired(item):
                # Expired but not yet swept by DynamoDB: it is absent. Remove it first.
                try:
                    await self._call(
                        "delete_item",
                        Key=self._key,
                        ConditionExpression="#x <= :now",
                        ExpressionAttributeNames={"#x": "x"},
                        ExpressionAttributeValues={":now": {"N": str(now)}},
                    )
                except Exception as exc:
                    if not is_conditional_failure(exc):
                        raise
                continue
            item = item or {}
            if guard:
                loads = self.table.serializer.loads
                stored = {
                    k: loads(item[ATTR_PREFIX + k]["S"]) for k in guard if ATTR_PREFIX + k in item
                }
                if not guard_holds(stored, guard):
                    return False
            current = {n: v for n, v in item.items() if n.startswith(ATTR_PREFIX)}
            size = sum(attr_size(n, v) for n, v in current.items())
            for name in plan.touched:
                if name in current:
                    size -= attr_size(name, current[name])
            size += plan.added
            if size > self.table.max_state_bytes:
                raise self._limit_error(size, "the run's state after this patch")
            params = plan.update(now, size_clause=("SET #sz = :size", {":size": {"N": str(size)}}))
            if "sz" in item:
                params["ConditionExpression"] = "#sz = :seen"
                params["ExpressionAttributeValues"][":seen"] = item["sz"]
            else:
                params["ConditionExpression"] = "attribute_not_exists(#sz)"
            params["ConditionExpression"] += self._guard_condition(params, guard)
            try:
                await self._write(params)
                return True
            except Exception as exc:
                if not is_conditional_failure(exc):
                    raise
        raise StateLimitError(
            f"run {self.run_id!r}: could not apply a patch near the state size limit "
            f"(concurrent writers kept changing the item)"
        )

    async def _write(self, params: dict[str, Any], **extra: Any) -> dict[str, Any]:
        try:
            return await self._call("update_item", Key=self._key, **params, **extra)
        except Exception as exc:
            if error_code(exc) == "ValidationException" and "size" in str(exc).lower():
                raise StateLimitError(
                    f"run {self.run_id!r}: DynamoDB refused the patch: {exc}; the run's "
                    f"state must stay under 400 KB"
                ) from exc
            raise

    def _limit_error(self, size: int, what: str) -> StateLimitError:
        return StateLimitError(
            f"run {self.run_id!r}: {what} would take {size:,} bytes; the limit is "
            f"{self.table.max_state_bytes:,} bytes (max_state_bytes: one DynamoDB item "
            f"holds at most 400 KB). Keep large values outside the workflow state "
            f"(e.g. in S3) and store a reference."
        )


@dataclass(slots=True)
class _Plan:
    """One patch, as expression parts: each key once (the last operation wins)."""

    ctx: DynamoDbContext
    sets: dict[str, dict[str, Any]]  # attribute name -> {"S": json}
    removes: list[str]
    added: int
    status: str | None

    @classmethod
    def build(cls, ctx: DynamoDbContext, ops: Iterable[PatchOperation]) -> _Plan:
        last: dict[str, PatchOperation] = {}
        for op in ops:
            last.pop(op.key, None)
            last[op.key] = op
        serializer = ctx.table.serializer
        sets: dict[str, dict[str, Any]] = {}
        removes: list[str] = []
        status: str | None = None
        # Every key and value is checked and encoded (or refused, naming the key)
        # before anything is sent.
        for key, op in last.items():
            name = ATTR_PREFIX + key
            if op.op == "set":
                sets[name] = {"S": encode_value(key, op.value, serializer)}
                if key == K.STATUS and isinstance(op.value, Mapping):
                    status = str(op.value.get("status"))
            else:
                check_key(key)
                removes.append(name)
        added = sum(attr_size(n, v) for n, v in sets.items())
        return cls(ctx, sets, removes, added, status)

    @property
    def touched(self) -> list[str]:
        return [*self.sets, *self.removes]

    def update(self, now: int, *, size_clause: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        """``UpdateItem`` parameters: the patch, the bookkeeping and ``size_clause``."""
        table = self.ctx.table
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        set_parts: list[str] = []
        remove_parts: list[str] = []
        for i, (name, value) in enumerate(self.sets.items()):
            names[f"#n{i}"] = name
            values[f":v{i}"] = value
            set_parts.append(f"#n{i}=:v{i}")
        offset = len(self.sets)
        for j, name in enumerate(self.removes, start=offset):
            names[f"#n{j}"] = name
            remove_parts.append(f"#n{j}")
        names.update({"#x": "x", "#t": "ttl", "#u": "u", "#sz": "sz"})
        values.update({**table.expiry(), ":u": {"N": str(now)}})
        set_parts += ["#x=:x", "#t=:t", "#u=:u"]
        if self.status is not None:
            names["#st"] = "st"
            values[":st"] = {"S": self.status}
            set_parts.append("#st=:st")
            names["#g"] = "g"
            if self.status in _FINAL:
                remove_parts.append("#g")
            else:
                values[":g"] = {"S": table.index_partition(table.shard_of(self.ctx.run_id))}
                set_parts.append("#g=:g")
        if self.ctx._long_id:
            names["#rid"] = "rid"
            values[":rid"] = {"S": self.ctx.run_id}
            set_parts.append("#rid=:rid")
        clause, clause_values = size_clause
        if clause.startswith("SET "):
            set_parts.append(clause[4:])
            extra = ""
        else:
            extra = " " + clause
        values.update(clause_values)
        expression = "SET " + ",".join(set_parts)
        if remove_parts:
            expression += " REMOVE " + ",".join(remove_parts)
        expression += extra
        if len(expression) > _MAX_EXPRESSION - 200:
            raise StateLimitError(
                f"run {self.ctx.run_id!r}: a patch of {len(self.sets) + len(self.removes)} "
                f"operations is too large for one DynamoDB update (4 KB expression limit); "
                f"write fewer keys per node"
            )
        return {
            "UpdateExpression": expression,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }


def _projection_chunks(keys: list[str]) -> Iterable[list[str]]:
    """Split keys so each ``#n0,#n1,...`` projection stays under the expression limit."""
    chunk: list[str] = []
    length = 3  # "#x"
    for key in keys:
        part = len(f"#n{len(chunk)},")
        if chunk and length + part > _MAX_EXPRESSION - 100:
            yield chunk
            chunk, length = [], 3
            part = len("#n0,")
        chunk.append(key)
        length += part
    yield chunk


def _now_ms() -> int:
    return int(time.time() * 1000)
