"""A run's context in its Durable Object (``FlowcraftRun``), one atomic batch per call.

The object keeps one SQLite row per context key. ``patch`` sends every set and
delete (and the guard) in one call, which the object runs in one
``transactionSync``: O(delta), all or nothing, and nothing else runs on the
object in between, so the guard's check and the write are one step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flowcraft.context import BatchReadContext, Guard, PatchOperation, check_guard
from flowcraft.distributed import keys as K
from flowcraft.errors import StateLimitError
from flowcraft.serializer import JsonSerializer, Serializer, check_key, encode_value
from flowcraft_cloudflare._client import WorkerClient, _TooLarge

__all__ = [
    "MAX_VALUE_BYTES",
    "DurableObjectContext",
    "PendingOps",
    "registry_object",
    "run_object",
]

logger = logging.getLogger("flowcraft.cloudflare")

MAX_VALUE_BYTES = 2 * 1024 * 1024
"""A SQLite-backed Durable Object stores at most 2 MB in one row (key + value)."""

_GUARD_JSON = JsonSerializer()


def escape_id(part: str) -> str:
    """The escaping of ``flowcraft.distributed.keys`` (``%`` and ``:``)."""
    return part.replace("%", "%25").replace(":", "%3A")


def run_object(namespace: str, run_id: str) -> str:
    """The name of a run's Durable Object (its context and coordination keys)."""
    return f"{namespace}/r:{escape_id(run_id)}"


def registry_object(namespace: str) -> str:
    """The name of a namespace's ``FlowcraftRegistry`` (its index of running runs)."""
    return f"{namespace}/runs"


def _guard_text(expected: int | str | None) -> str | None:
    """The JSON text a guarded key must hold (compared as text in the object: the
    stored value is the text this serializer wrote, so 3 matches only the number 3)."""
    return None if expected is None else _GUARD_JSON.dumps(expected)


def _repeatable(op: Mapping[str, Any]) -> bool:
    """Whether sending ``op`` twice leaves what one send would (and answers the same).
    A write-behind mark is: nobody reads its answer."""
    if op.get("mark"):
        return True
    return op["op"] not in {"incr", "setnx", "admit"} and not (
        op["op"] == "patch" and op.get("guard")
    )


class PendingOps:
    """Ops waiting to ride along with the next call to their object (write-behind)."""

    def __init__(self) -> None:
        self.by_object: dict[str, list[dict[str, Any]]] = {}

    def add(self, object_name: str, op: dict[str, Any]) -> None:
        self.by_object.setdefault(object_name, []).append(op)

    def take(self, object_name: str) -> list[dict[str, Any]]:
        return self.by_object.pop(object_name, [])

    def take_all(self) -> dict[str, list[dict[str, Any]]]:
        taken, self.by_object = self.by_object, {}
        return taken


class DurableObjectContext(BatchReadContext):
    """The context of ``run_id``: rows of its run object, read and patched in batches.

    Args:
        client: the Worker client.
        object_name: the run object's name (see :func:`run_object`).
        run_id: for error messages.
        serializer: turns values into the JSON text the object stores.
        ttl_seconds: the object is deleted this long after its last write.
        max_value_bytes: the largest key + value one row may hold.
        pending: write-behind ops that ride along with this context's next call.
        registry: the registry object a patch writing the run's status enters the run
            in (status "running") or removes it from (any other status): the
            reconciler's index. None (a bare context store): no index.
    """

    def __init__(
        self,
        client: WorkerClient,
        object_name: str,
        run_id: str,
        *,
        serializer: Serializer | None = None,
        ttl_seconds: float = 7 * 24 * 3600,
        max_value_bytes: int = MAX_VALUE_BYTES,
        pending: PendingOps | None = None,
        registry: str | None = None,
    ) -> None:
        self.client = client
        self.object_name = object_name
        self.run_id = run_id
        self.serializer = serializer or JsonSerializer()
        self.ttl_seconds = ttl_seconds
        self.max_value_bytes = max_value_bytes
        self.pending = pending
        self.registry = registry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r})"

    async def batch(self, ops: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Run raw object ops as one atomic step (one round trip). Write-behind ops
        waiting for this object go first in the same call."""
        riders = self.pending.take(self.object_name) if self.pending is not None else []
        sent = [*riders, *ops]
        try:
            answer = await self.client.call(
                "do",
                {"object": self.object_name, "ttl": self.ttl_seconds, "ops": sent},
                retry=all(_repeatable(op) for op in sent),
            )
        except _TooLarge as exc:
            raise StateLimitError(
                f"run {self.run_id!r}: the value of {exc.key!r} is {exc.size} bytes; a "
                f"Durable Object row holds at most {self.max_value_bytes}"
            ) from exc
        results: list[dict[str, Any]] = answer["results"]
        return results[len(riders) :]

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        if not keys:
            return {}
        (result,) = await self.batch([{"op": "get", "keys": list(keys)}])
        return self.decode_values(result)

    def decode_values(self, result: Mapping[str, Any]) -> dict[str, Any]:
        return {key: self.serializer.loads(text) for key, text in result["values"]}

    async def to_dict(self) -> dict[str, Any]:
        (result,) = await self.batch([{"op": "dump"}])
        return self.decode_values(result)

    def patch_op(
        self,
        ops: Sequence[PatchOperation],
        guard: Guard | None = None,
    ) -> dict[str, Any]:
        """The object op for ``patch`` (the last operation on a key wins)."""
        check_guard(guard)
        final: dict[str, str | None] = {}
        status: str | None = None
        for op in ops:
            check_key(op.key)
            if op.key == K.STATUS:
                value = op.value if op.op == "set" else None
                status = value.get("status") if isinstance(value, dict) else None
            if op.op == "set":
                text = encode_value(op.key, op.value, self.serializer)
                size = len(op.key.encode("utf-8", "surrogatepass")) + len(
                    text.encode("utf-8", "surrogatepass")
                )
                if size > self.max_value_bytes:
                    raise StateLimitError(
                        f"run {self.run_id!r}: key {op.key[:200]!r} and its value take "
                        f"{size} bytes; a Durable Object row holds at most {self.max_value_bytes}"
                    )
                final[op.key] = text
            elif op.op == "delete":
                final[op.key] = None
            else:
                raise ValueError(f"unknown patch operation {op.op!r}")
        body: dict[str, Any] = {
            "op": "patch",
            "set": [[k, v] for k, v in final.items() if v is not None],
            "delete": [k for k, v in final.items() if v is None],
        }
        if guard:
            body["guard"] = [[k, _guard_text(v)] for k, v in guard.items()]
        if self.registry is not None and K.STATUS in final:
            body["track"] = {
                "registry": self.registry,
                "run": self.run_id,
                "status": str(status) if status is not None else "",
                "key": K.STATUS,
            }
        return body

    async def patch(
        self,
        ops: Sequence[PatchOperation],
        *,
        guard: Guard | None = None,
    ) -> bool:
        """Apply ``ops`` atomically; with ``guard``, only if every guarded key holds the
        expected value (None: absent). False, writing nothing, when the guard fails."""
        if not ops and not guard:
            return True
        (result,) = await self.batch([self.patch_op(ops, guard)])
        return bool(result["applied"])
