"""Run state in Cosmos DB: :class:`CosmosRunStore` (one container) and
:class:`CosmosContext` (one run).

Costs, per call (the layout is in ``_cosmos.py``):

* ``get_many``: one query projecting just the asked keys (``c.c[@k0] AS k0, ...``),
  whatever the size of the state.
* ``patch`` of up to 10 distinct keys: one ``patch_item`` (all or nothing); a guard
  rides along as its ``filter_predicate``, checked and written in the same request.
* ``patch`` of more keys: Cosmos takes at most 10 operations per patch, and the
  test server has no transactional batch of patches, so a larger commit reads the
  item and replaces it under its etag (``If-Match``): still one atomic write, at
  the price of the item's size; a concurrent write makes it read and try again.
* the first write of a run creates its item (a race to create: the loser patches).
* ``to_dict``: one query for the whole context (finalization only).

A 429 (throttled) that outlasts the client's own retries becomes
:class:`~flowcraft.errors.RetryJob` with the server's retry-after, so the job is
handed back, not failed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from azure.core import MatchConditions
from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import CosmosHttpResponseError

from flowcraft.context import BatchReadContext, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.errors import RetryJob, SerializationError, StateLimitError
from flowcraft.serializer import JsonSerializer, Serializer, check_key, encode_value
from flowcraft_azure._cosmos import (
    CONTEXT_FIELD,
    RESULT_ID,
    STATE_ID,
    field_name,
    guard_holds,
    guard_predicate,
    key_of,
    partition_value,
    patch_path,
)

STATUS_KEY = K.STATUS

__all__ = ["DEFAULT_MAX_STATE_BYTES", "MAX_PATCH_OPERATIONS", "CosmosContext", "CosmosRunStore"]

logger = logging.getLogger("flowcraft.azure")

MAX_PATCH_OPERATIONS = 10
"""Cosmos DB's limit of operations in one ``patch_item``."""

DEFAULT_MAX_STATE_BYTES = 2 * 1024 * 1024 - 64 * 1024
"""Below Cosmos DB's 2 MB item limit, with room for the item's own fields."""

_STATUS_THROTTLED = 429
_STATUS_TOO_LARGE = 413
_STATUS_PRECONDITION = 412
_STATUS_CONFLICT = 409
_STATUS_NOT_FOUND = 404
_MAX_REPLACE_TRIES = 50
# Query texts hold only constants and parameter names; keys and run ids are parameters.
_WHERE_STATE = 'WHERE c.run = @run AND c.id = "state"'
_SELECT_STATE = 'SELECT * FROM c WHERE c.run = @run AND c.id = "state"'
_SELECT_CONTEXT = 'SELECT VALUE c.c FROM c WHERE c.run = @run AND c.id = "state"'
_SELECT_STALLED = (
    'SELECT VALUE c.runId FROM c WHERE c.id = "state" AND c.st = "running" AND c._ts < @cutoff'
)
_SELECT_RESULT = 'SELECT VALUE c.result FROM c WHERE c.run = @run AND c.id = "result"'

Guard = Mapping[str, int | str | None]


def throttled(exc: CosmosHttpResponseError) -> RetryJob:
    """A 429 as a hand-back after the server's retry-after (at least 0.1 s)."""
    headers: Mapping[str, str] = getattr(exc.response, "headers", None) or {}
    try:
        delay = float(headers.get("x-ms-retry-after-ms", "1000")) / 1000
    except ValueError:
        delay = 1.0
    return RetryJob(
        f"Cosmos DB is throttling requests (429): {exc.message}", delay_seconds=max(0.1, delay)
    )


class CosmosRunStore:
    """Run states and results in one Cosmos DB container (partition key ``/run``).

    Args:
        container: an ``azure.cosmos.aio.ContainerProxy``; create it with
            :func:`flowcraft_azure.ensure_resources`.
        serializer: how values become JSON text (the runtime's serializer).
        max_state_bytes: bytes one run's state may hold; a write past it raises
            :class:`~flowcraft.errors.StateLimitError` naming the run and key.
        ready: awaited before every call (the adapter opens its client there).
    """

    def __init__(
        self,
        container: ContainerProxy,
        *,
        serializer: Serializer | None = None,
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.container = container
        self._ready = ready
        self.requests: Counter[str] = Counter()
        """Requests sent, by kind (query, patch, replace, create): for benchmarks."""
        self.serializer: Serializer = serializer or JsonSerializer()
        self.max_state_bytes = max_state_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(container={self.container.id!r})"

    def context(self, run_id: str) -> CosmosContext:
        return CosmosContext(self, run_id)

    # ------------------------------------------------------------ reads

    async def _query(self, run_id: str, query: str, parameters: list[dict[str, Any]]) -> list[Any]:
        if self._ready is not None:
            await self._ready()
        pk = partition_value(run_id)
        params = [{"name": "@run", "value": pk}, *parameters]
        self.requests["query"] += 1
        try:
            return [
                item
                async for item in self.container.query_items(
                    query, parameters=params, partition_key=pk
                )
            ]
        except CosmosHttpResponseError as exc:
            if exc.status_code == _STATUS_THROTTLED:
                raise throttled(exc) from exc
            raise

    async def read(self, run_id: str, keys: Sequence[str]) -> dict[str, Any]:
        """The present keys among ``keys``: one query projecting only them (a key no
        store can keep, such as one with a lone surrogate, is never present)."""
        wanted = [k for k in dict.fromkeys(keys) if _storable(k)]
        if not wanted:
            return {}
        columns = ", ".join(f"c.{CONTEXT_FIELD}[@k{i}] AS k{i}" for i in range(len(wanted)))
        query = f"SELECT {columns} FROM c {_WHERE_STATE}"  # noqa: S608 (constants only)
        params = [{"name": f"@k{i}", "value": field_name(k)} for i, k in enumerate(wanted)]
        rows = await self._query(run_id, query, params)
        if not rows:
            return {}
        row = rows[0]
        loads = self.serializer.loads
        found: dict[str, Any] = {}
        for i, key in enumerate(wanted):
            text = row.get(f"k{i}")
            if isinstance(text, str):
                found[key] = loads(text)
        return found

    async def read_all(self, run_id: str) -> dict[str, Any]:
        rows = await self._query(run_id, _SELECT_CONTEXT, [])
        if not rows or not isinstance(rows[0], dict):
            return {}
        loads = self.serializer.loads
        return {
            key_of(name): loads(text) for name, text in rows[0].items() if isinstance(text, str)
        }

    # ------------------------------------------------------------ writes

    async def patch(
        self, run_id: str, ops: Sequence[PatchOperation], guard: Guard | None = None
    ) -> bool:
        """Apply ``ops`` atomically, if ``guard`` holds; False (nothing written) if not."""
        texts: dict[str, str | None] = {}
        for op in ops:  # the last op on a key wins, as in memory
            texts.pop(op.key, None)
            if op.op == "delete":
                check_key(op.key)
                texts[op.key] = None
            else:
                texts[op.key] = self._dumps(run_id, op.key, op.value)
        expected = {k: self._guard_text(k, v) for k, v in (guard or {}).items()}
        if not texts and not expected:
            return True
        if self._ready is not None:
            await self._ready()
        try:
            while True:
                if not texts or len(texts) + (STATUS_KEY in texts) > MAX_PATCH_OPERATIONS:
                    outcome = await self._replace(run_id, texts, expected)
                else:
                    outcome = await self._patch(run_id, texts, expected)
                if outcome is not None:
                    return outcome
        except CosmosHttpResponseError as exc:
            if exc.status_code == _STATUS_THROTTLED:
                raise throttled(exc) from exc
            if exc.status_code == _STATUS_TOO_LARGE:
                raise self._too_large(run_id, texts) from exc
            raise

    async def _patch(
        self, run_id: str, texts: Mapping[str, str | None], expected: Mapping[str, str | None]
    ) -> bool | None:
        """One ``patch_item``; None: the item does not exist and was not created here
        because someone else created it first (try again)."""
        operations = [{"op": "set", "path": patch_path(k), "value": v} for k, v in texts.items()]
        if STATUS_KEY in texts:
            operations.append({"op": "set", "path": "/st", "value": self._status(texts)})
        options: dict[str, Any] = {}
        if expected:
            options["filter_predicate"] = guard_predicate(expected)
        pk = partition_value(run_id)
        self.requests["patch"] += 1
        try:
            await self.container.patch_item(
                STATE_ID, pk, patch_operations=operations, no_response=True, **options
            )
        except CosmosHttpResponseError as exc:
            if exc.status_code == _STATUS_PRECONDITION and expected:
                return False
            if exc.status_code == _STATUS_NOT_FOUND:
                return await self._create(run_id, texts, expected)
            raise
        return True

    async def _replace(
        self, run_id: str, texts: Mapping[str, str | None], expected: Mapping[str, str | None]
    ) -> bool | None:
        """Read the item, apply ``texts`` in memory, replace it if its etag is unchanged."""
        for _ in range(_MAX_REPLACE_TRIES):
            rows = await self._query(run_id, _SELECT_STATE, [])
            if not rows:
                return await self._create(run_id, texts, expected)
            item = rows[0]
            fields: dict[str, Any] = item.setdefault(CONTEXT_FIELD, {})
            if not guard_holds(fields, expected):
                return False
            if not texts:
                return True
            for key, text in texts.items():
                fields[field_name(key)] = text
            if STATUS_KEY in texts:
                item["st"] = self._status(texts)
            self._check_size(run_id, texts, item)
            self.requests["replace"] += 1
            try:
                await self.container.replace_item(
                    STATE_ID,
                    item,
                    etag=item["_etag"],
                    match_condition=MatchConditions.IfNotModified,
                    no_response=True,
                )
            except CosmosHttpResponseError as exc:
                if exc.status_code == _STATUS_PRECONDITION:
                    continue  # written meanwhile: read again
                raise
            return True
        raise RetryJob(f"run {run_id!r}: the state kept changing under a large commit")

    async def _create(
        self, run_id: str, texts: Mapping[str, str | None], expected: Mapping[str, str | None]
    ) -> bool | None:
        """The run's first write creates its item; None if another writer won the race."""
        if any(text is not None for text in expected.values()):
            return False  # the guard wants a key present in a state that does not exist
        fields = {field_name(k): v for k, v in texts.items() if v is not None}
        item = {
            "id": STATE_ID,
            "run": partition_value(run_id),
            "runId": run_id,
            "st": self._status(texts),
            CONTEXT_FIELD: fields,
        }
        self._check_size(run_id, texts, item)
        self.requests["create"] += 1
        try:
            await self.container.create_item(item, no_response=True)
        except CosmosHttpResponseError as exc:
            if exc.status_code == _STATUS_CONFLICT:
                return None
            raise
        return True

    # ------------------------------------------------------------ results

    async def write_result(self, run_id: str, result: Mapping[str, Any]) -> bool:
        """Store the run's result unless one is stored: ``create_item`` (409 keeps the first)."""
        if self._ready is not None:
            await self._ready()
        item = {
            "id": RESULT_ID,
            "run": partition_value(run_id),
            "runId": run_id,
            "result": self.serializer.dumps(dict(result)),
        }
        self.requests["create"] += 1
        try:
            await self.container.create_item(item, no_response=True)
        except CosmosHttpResponseError as exc:
            if exc.status_code == _STATUS_CONFLICT:
                return False
            if exc.status_code == _STATUS_THROTTLED:
                raise throttled(exc) from exc
            if exc.status_code == _STATUS_TOO_LARGE:
                raise StateLimitError(f"run {run_id!r}: the final result is too large") from exc
            raise
        return True

    async def read_result(self, run_id: str) -> dict[str, Any] | None:
        rows = await self._query(run_id, _SELECT_RESULT, [])
        if not rows or not isinstance(rows[0], str):
            return None
        result: dict[str, Any] = self.serializer.loads(rows[0])
        return result

    def _status(self, texts: Mapping[str, str | None]) -> str | None:
        """The run's status as a top-level property ``st`` (mirrored from the status key
        in the same write), so :meth:`stalled` can find running runs by index."""
        text = texts.get(STATUS_KEY)
        if text is None:
            return None
        record = self.serializer.loads(text)
        status = record.get("status") if isinstance(record, dict) else None
        return status if isinstance(status, str) else None

    async def stalled(self, older_than_seconds: float, limit: int) -> list[str]:
        """Runs whose status is ``running`` and whose state has not been written for
        ``older_than_seconds``: one cross-partition query (``st`` and ``_ts``)."""
        if self._ready is not None:
            await self._ready()
        cutoff = int(time.time() - older_than_seconds)
        self.requests["query"] += 1
        found: list[str] = []
        rows: AsyncIterator[Any] = self.container.query_items(
            _SELECT_STALLED, parameters=[{"name": "@cutoff", "value": cutoff}], max_item_count=limit
        )
        async for row in rows:  # VALUE rows: the run ids themselves
            if isinstance(row, str):
                found.append(row)
            if len(found) >= limit:
                break
        return found

    def _guard_text(self, key: str, value: object) -> str | None:
        """The JSON text a guard key must hold (None: absent). Only None, int and str
        are guard values (a bool is not an int here)."""
        check_key(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError(f"guard value of {key!r} must be None, int or str, not {value!r}")
        return self.serializer.dumps(value)

    # ------------------------------------------------------------ limits

    def _dumps(self, run_id: str, key: str, value: Any) -> str:
        """The value's JSON text, checked by the core (a key or value no store can keep
        raises ``SerializationError`` naming the key) and against the size limit."""
        text = encode_value(key, value, self.serializer)
        size = len(text.encode()) + len(key.encode())
        if size > self.max_state_bytes:
            raise StateLimitError(
                f"run {run_id!r}: key {key!r} holds {size} bytes; a run's state may hold "
                f"{self.max_state_bytes} (Cosmos DB's item limit is 2 MB)"
            )
        return text

    def _check_size(
        self, run_id: str, texts: Mapping[str, str | None], item: Mapping[str, Any]
    ) -> None:
        size = len(JsonSerializer().dumps(item).encode("utf-8", "surrogatepass"))
        if size > self.max_state_bytes:
            raise self._too_large(run_id, texts, size)

    def _too_large(
        self, run_id: str, texts: Mapping[str, str | None], size: int | None = None
    ) -> StateLimitError:
        largest = max(texts, key=lambda k: len(texts[k] or ""), default="?")
        held = f" ({size} bytes)" if size is not None else ""
        return StateLimitError(
            f"run {run_id!r}: writing key {largest!r} would take the state past "
            f"{self.max_state_bytes} bytes{held} (Cosmos DB's item limit is 2 MB)"
        )


def _storable(key: str) -> bool:
    try:
        check_key(key)
    except SerializationError:
        return False
    return True


class CosmosContext(BatchReadContext):
    """One run's context, in its ``state`` item of a :class:`CosmosRunStore`."""

    __slots__ = ("run_id", "store")

    def __init__(self, store: CosmosRunStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r})"

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        return await self.store.read(self.run_id, keys)

    async def to_dict(self) -> dict[str, Any]:
        return await self.store.read_all(self.run_id)

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        """All of ``ops`` or none; with ``guard``, only if every key holds its expected
        value (None: absent), checked in the same request. False if the guard failed."""
        return await self.store.patch(self.run_id, ops, guard)
