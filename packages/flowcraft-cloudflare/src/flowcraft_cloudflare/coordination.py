"""Coordination keys in Durable Objects: each key lives in its run's object.

Every key of the protocol names its run (``<prefix><kind>:<run>:...``, see
``flowcraft.distributed.keys``), so it is stored in that run's ``FlowcraftRun``
object beside the context: one object serialises everything about a run, and a
job's context and coordination calls go to the same place. A key that names no
run (another prefix, an unknown kind) gets an object of its own (``k:<key>``):
still atomic per key, which is all the store contract asks.

Each key carries its expiry; the object treats an expired key as absent on every
read and purges the rows with an alarm once everything in it has expired.
"""

from __future__ import annotations

from typing import Any

from flowcraft.distributed.coordination import validate_ttl_seconds
from flowcraft_cloudflare._client import WorkerClient
from flowcraft_cloudflare.context import _repeatable, run_object

__all__ = ["PROTOCOL_KINDS", "DurableObjectCoordinationStore"]

#: The kinds of per-run coordination keys (``flowcraft.distributed.keys``).
PROTOCOL_KINDS = frozenset(
    {"lease", "done", "join", "fired", "latch", "end", "final", "attempts", "result"}
)


class DurableObjectCoordinationStore:
    """A ``CoordinationStore`` on the companion Worker's ``FlowcraftRun`` objects.

    Args:
        client: the Worker client.
        namespace: keeps apps sharing one Worker apart (the objects' name prefix).
        key_prefix: the adapter's key prefix; keys under it are routed to their run.
    """

    def __init__(
        self, client: WorkerClient, *, namespace: str = "flowcraft", key_prefix: str = "flowcraft:"
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.key_prefix = key_prefix

    def __repr__(self) -> str:
        return f"{type(self).__name__}(namespace={self.namespace!r})"

    def object_for(self, key: str) -> str:
        """The object holding ``key``: its run's, or one of its own."""
        if key.startswith(self.key_prefix):
            kind, sep, rest = key[len(self.key_prefix) :].partition(":")
            if sep and kind in PROTOCOL_KINDS:
                escaped_run = rest.partition(":")[0]
                return f"{self.namespace}/r:{escaped_run}"
        return f"{self.namespace}/k:{key}"

    def run_object(self, run_id: str) -> str:
        return run_object(self.namespace, run_id)

    async def _one(self, key: str, op: dict[str, Any]) -> dict[str, Any]:
        answer = await self.client.call(
            "do", {"object": self.object_for(key), "ops": [op]}, retry=_repeatable(op)
        )
        result: dict[str, Any] = answer["results"][0]
        return result

    async def increment(self, key: str, ttl_seconds: float) -> int:
        ttl = validate_ttl_seconds(ttl_seconds)
        return int((await self._one(key, {"op": "incr", "key": key, "ttl": ttl}))["value"])

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        ttl = validate_ttl_seconds(ttl_seconds)
        op = {"op": "setnx", "key": key, "value": value, "ttl": ttl}
        return bool((await self._one(key, op))["set"])

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        ttl = validate_ttl_seconds(ttl_seconds)
        return bool((await self._one(key, {"op": "expire", "key": key, "ttl": ttl}))["ok"])

    async def delete(self, key: str) -> None:
        await self._one(key, {"op": "cdel", "keys": [key]})

    async def get(self, key: str) -> str | None:
        value = (await self._one(key, {"op": "cget", "key": key}))["value"]
        return None if value is None else str(value)

    async def delete_many(self, keys: list[str]) -> None:
        """Delete keys with one call per object holding them."""
        by_object: dict[str, list[str]] = {}
        for key in keys:
            by_object.setdefault(self.object_for(key), []).append(key)
        for name, group in by_object.items():
            await self.client.call("do", {"object": name, "ops": [{"op": "cdel", "keys": group}]})

    async def aclose(self) -> None:
        """Nothing of its own to close (the client belongs to whoever made it)."""
