"""``DynamoDbCoordinationStore``: the five coordination operations on DynamoDB items.

One item per key (``namespace/kv/<key>``) with the value in ``v`` (a string, or a
number for counters), the expiry in ``x`` (epoch milliseconds) and ``ttl``
(epoch seconds, for DynamoDB's TTL sweeper).

DynamoDB deletes expired items lazily, possibly days later, so expiry never
depends on deletion: reads treat an item whose ``x`` has passed as absent, and
every write wins over an expired item through its ``ConditionExpression``.

======================  ===============================================================
``increment``           ``UpdateItem ADD v 1`` if absent or live (1 call); an expired
                        counter is restarted by a second, conditional ``UpdateItem``
``set_if_not_exist``    ``PutItem`` if ``attribute_not_exists(x) OR x <= now``
``extend_ttl``          ``UpdateItem SET x`` if ``x > now``
``delete``              ``DeleteItem``
``get``                 ``GetItem`` (strongly consistent), expired reads as ``None``
======================  ===============================================================

Expiry uses this machine's wall clock: keep workers' clocks in sync (NTP); a
lease is only as precise as their agreement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from flowcraft.distributed.coordination import validate_ttl_seconds
from flowcraft_sqs._client import (
    AwsClients,
    AwsSettings,
    error_code,
    is_conditional_failure,
    item_key,
    logger,
    validate_namespace,
)

__all__ = ["DynamoDbCoordinationStore"]

_NAMES = {"#v": "v", "#x": "x", "#t": "ttl"}
_RETRIES = 20


class DynamoDbCoordinationStore:
    """A :class:`~flowcraft.distributed.CoordinationStore` on a DynamoDB table.

    Args:
        table_name: a table with a string partition key ``pk`` (see
            :func:`flowcraft_sqs.create_table`); it may be the adapter's state table.
        clients: shared :class:`AwsClients` (stay open after :meth:`aclose`).
        aws: settings to create clients from when none are given (closed by
            :meth:`aclose`).
        namespace: keeps apps (or tests) sharing a table apart.
        clock: wall-clock seconds since the epoch (injectable for tests).
    """

    def __init__(
        self,
        table_name: str = "flowcraft",
        *,
        clients: AwsClients | None = None,
        aws: AwsSettings | None = None,
        namespace: str = "flowcraft",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if clients is not None and aws is not None:
            raise ValueError("pass clients= or aws=, not both")
        self._owns_clients = clients is None
        self.clients = clients if clients is not None else AwsClients(aws)
        self.table_name = table_name
        self.namespace = validate_namespace(namespace)
        self.clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self.table_name!r}, namespace={self.namespace!r})"

    def _key(self, key: str) -> dict[str, Any]:
        return {"pk": {"S": item_key(self.namespace, "kv", key)}}

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _expiry(self, ttl_seconds: float, now_ms: int) -> dict[str, Any]:
        expires_ms = now_ms + max(1, math.ceil(ttl_seconds * 1000))
        return {
            ":x": {"N": str(expires_ms)},
            ":t": {"N": str(math.ceil(expires_ms / 1000))},
        }

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        return await self.clients.dynamodb_call(operation, TableName=self.table_name, **params)

    async def increment(self, key: str, ttl_seconds: float) -> int:
        """Add 1 and return the new value; a missing or expired counter starts at 1 with
        ``ttl_seconds``, a live one keeps its expiry."""
        ttl = validate_ttl_seconds(ttl_seconds)
        for _ in range(_RETRIES):
            now = self._now_ms()
            values = {**self._expiry(ttl, now), ":one": {"N": "1"}, ":now": {"N": str(now)}}
            try:
                response = await self._call(
                    "update_item",
                    Key=self._key(key),
                    UpdateExpression="ADD #v :one SET #x = if_not_exists(#x, :x), "
                    "#t = if_not_exists(#t, :t)",
                    ConditionExpression="attribute_not_exists(#x) OR #x > :now",
                    ExpressionAttributeNames=_NAMES,
                    ExpressionAttributeValues=values,
                    ReturnValues="UPDATED_NEW",
                )
                return int(response["Attributes"]["v"]["N"])
            except Exception as exc:
                if error_code(exc) == "ValidationException" and "data type" in str(exc):
                    raise ValueError(f"value at {key!r} is not an integer counter") from None
                if not is_conditional_failure(exc):
                    raise
            # The counter expired (DynamoDB has not deleted it yet): start it again,
            # unless another caller just did.
            try:
                await self._call(
                    "update_item",
                    Key=self._key(key),
                    UpdateExpression="SET #v = :one, #x = :x, #t = :t",
                    ConditionExpression="#x <= :now",
                    ExpressionAttributeNames=_NAMES,
                    ExpressionAttributeValues=values,
                )
                return 1
            except Exception as exc:
                if not is_conditional_failure(exc):
                    raise
        raise RuntimeError(f"increment of {key!r} kept racing with expiry; giving up")

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        """Create ``key`` if it is absent or expired; True for the caller that did."""
        ttl = validate_ttl_seconds(ttl_seconds)
        now = self._now_ms()
        expiry = self._expiry(ttl, now)
        try:
            await self._call(
                "put_item",
                Item={
                    **self._key(key),
                    "v": {"S": value},
                    "x": expiry[":x"],
                    "ttl": expiry[":t"],
                },
                ConditionExpression="attribute_not_exists(#x) OR #x <= :now",
                ExpressionAttributeNames={"#x": "x"},
                ExpressionAttributeValues={":now": {"N": str(now)}},
            )
        except Exception as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        """Make a live key expire ``ttl_seconds`` from now; False (and nothing written)
        if it is absent or expired."""
        ttl = validate_ttl_seconds(ttl_seconds)
        now = self._now_ms()
        try:
            await self._call(
                "update_item",
                Key=self._key(key),
                UpdateExpression="SET #x = :x, #t = :t",
                ConditionExpression="#x > :now",
                ExpressionAttributeNames={"#x": "x", "#t": "ttl"},
                ExpressionAttributeValues={**self._expiry(ttl, now), ":now": {"N": str(now)}},
            )
        except Exception as exc:
            if is_conditional_failure(exc):
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        """``DeleteItem``; an absent key is fine."""
        await self._call("delete_item", Key=self._key(key))

    async def get(self, key: str) -> str | None:
        """The value (counters as decimal text), or None if absent or expired."""
        response = await self._call(
            "get_item",
            Key=self._key(key),
            ConsistentRead=True,
            ProjectionExpression="#v, #x",
            ExpressionAttributeNames={"#v": "v", "#x": "x"},
        )
        item = response.get("Item")
        if not item or "v" not in item:
            return None
        expiry = item.get("x")
        if expiry is not None and int(expiry["N"]) <= self._now_ms():
            return None
        value = item["v"]
        return str(value["S"] if "S" in value else value["N"])

    async def __aenter__(self) -> DynamoDbCoordinationStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the clients this store created; given clients stay open."""
        if self._owns_clients:
            self.clients.close()
            logger.debug("closed the coordination store's AWS clients")
