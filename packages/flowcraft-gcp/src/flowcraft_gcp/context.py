"""``FirestoreContext``: a run's state in ONE Firestore document.

Layout of the run document ``{collection}/{run}``::

    c: map   field name -> JSON text of one context value
    r: text  the run id (the document id may be a hash of it)
    x: time  expiry, refreshed by every write (a Firestore TTL policy deletes it)
    a: time  last write while the run has not ended (the reconciler's index)

Why this shape:

* **Every key round-trips.** Context keys are never written as dotted strings
  (``update()`` reads dots as nesting). Each key becomes the field name
  ``"k" + key`` inside the map ``c``, addressed with the client's escaped field path
  (``FieldPath("c", name)``), so quotes, dots, backticks, NUL and emoji are
  literal. The prefix keeps the empty key and names like ``__name__`` (reserved
  by Firestore) legal; a key past Firestore's 1,500-byte field-path limit, or one
  that is not valid UTF-8, is stored under ``"h" + sha256(key)`` with the key
  beside its value.
* **Values are JSON text**, so big integers, floats such as ``1e16``, nested
  arrays and any key names inside values survive exactly (Firestore's own types
  would turn large ints into errors and arrays of arrays into refusals), and the
  map holds only strings, which a single-field index exemption on ``c`` keeps out
  of the 40,000-entries index budget.
* **A patch is one write carrying only its delta**: ``set(..., merge=[paths])`` with
  ``DELETE_FIELD`` for deletions (an upsert: no read, works on a new run).
* **Partial reads**: ``get(field_paths=[...])`` returns only the named fields.
* **The guarded patch** (``patch(ops, guard=...)``) needs no transaction (the
  emulator stalls ~30 s on contended ones): the guard keys' values and the
  document's ``update_time`` come from one partial read, and the write carries the
  precondition ``update_time == that``, so check and write are one atomic step on
  the server. A context remembers the snapshot of its last read and of its own
  guarded writes, so a guard over keys it just read needs no extra read; a
  precondition that fails because another write landed meanwhile reads again.
* **1 MiB per document**: a patch that can never fit, or a state that Firestore
  refuses as too large, raises :class:`~flowcraft.StateLimitError` naming the run
  and the largest key; nothing is written.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import random
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from google.api_core import exceptions as google_errors
from google.cloud.firestore_v1 import DELETE_FIELD
from google.cloud.firestore_v1.async_client import AsyncClient as FirestoreAsyncClient
from google.cloud.firestore_v1.async_document import AsyncDocumentReference
from google.cloud.firestore_v1.base_query import FieldFilter
from google.cloud.firestore_v1.field_path import FieldPath

from flowcraft.context import BatchReadContext, Guard, PatchOperation, check_guard, guard_holds
from flowcraft.distributed import keys as K
from flowcraft.errors import RetryJob, StateLimitError
from flowcraft.serializer import JsonSerializer, Serializer, check_key, encode_value
from flowcraft_gcp._clients import GcpClients

__all__ = [
    "DEFAULT_MAX_STATE_BYTES",
    "FIRESTORE_DOCUMENT_LIMIT",
    "FirestoreContext",
    "RunCollection",
]

FIRESTORE_DOCUMENT_LIMIT = 1_048_576
"""Firestore's maximum document size (1 MiB)."""

DEFAULT_MAX_STATE_BYTES = FIRESTORE_DOCUMENT_LIMIT - 16_384
"""What a run's values and keys may take, leaving room for the document's own fields."""

_MAP = "c"
_RUN = "r"
_EXPIRES = "x"
_ACTIVE = "a"
_PLAIN = "k"
_HASHED = "h"
_MAX_NAME_BYTES = 1_400  # under Firestore's 1,500-byte field-path limit, with "c." and escapes
_SAFE_ID = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_\-.:@=+]{0,199}")
_GUARD_ROUNDS = 50


def _field_name(key: str) -> tuple[str, bool]:
    """The map field that holds ``key``, and whether the key must be stored beside the
    value (hashed names)."""
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        encoded = b""
        hashed = True
    else:
        hashed = len(encoded) + 1 > _MAX_NAME_BYTES
    if not hashed:
        return _PLAIN + key, False
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return _HASHED + digest, True


def _path(name: str) -> str:
    return FieldPath(_MAP, name).to_api_repr()


def document_id(run_id: str) -> str:
    """The run's document id: the run id when Firestore allows it as it is, else a hash
    (``~`` never appears in a plain id, so the two cannot collide)."""
    if _SAFE_ID.fullmatch(run_id) and not (run_id.startswith("__") and run_id.endswith("__")):
        return run_id
    return "~" + hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class _Snapshot:
    """What one read (or our own guarded write) saw: the document's version, the stored
    text of some fields (None: absent), and how many writes this process had made to
    the document before (a later local write makes the snapshot stale for sure)."""

    exists: bool
    update_time: Any
    texts: dict[str, str | None]
    local_writes: int


class _LocalRun:
    """This process's writes to one run document: a count, and a lock that lines up
    its guarded patches, so concurrent jobs of one run in one worker (a fan-out's
    branches) do not each lose the precondition race to the others and retry."""

    __slots__ = ("__weakref__", "lock", "writes")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.writes = 0


@dataclass(frozen=True, slots=True)
class RunCollection:
    """Where runs live in Firestore, and the rules for their documents.

    Args:
        clients: the Firestore (and Pub/Sub) clients.
        collection: the collection of run documents.
        max_state_bytes: bytes of keys and values one run may hold (under 1 MiB).
        state_ttl_seconds: the expiry written to every run document (field ``x``) for
            a Firestore TTL policy on that field (the emulator has no TTL policies).
        serializer: encodes context values (JSON by default; never pickle).
    """

    clients: GcpClients
    collection: str = "flowcraft_runs"
    max_state_bytes: int = DEFAULT_MAX_STATE_BYTES
    state_ttl_seconds: float = 7 * 24 * 3600
    serializer: Serializer = field(default_factory=JsonSerializer)
    _local: weakref.WeakValueDictionary[str, _LocalRun] = field(
        default_factory=weakref.WeakValueDictionary, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 0 < self.max_state_bytes <= FIRESTORE_DOCUMENT_LIMIT:
            raise ValueError("max_state_bytes must be in 1..1,048,576 (Firestore's limit)")

    def context(self, run_id: str) -> FirestoreContext:
        return FirestoreContext(self, run_id)

    def local(self, run_id: str) -> _LocalRun:
        """This process's bookkeeping of ``run_id`` (kept while a context holds it)."""
        found = self._local.get(run_id)
        if found is None:
            found = self._local[run_id] = _LocalRun()
        return found

    def document(self, run_id: str) -> AsyncDocumentReference:
        return self.clients.firestore().collection(self.collection).document(document_id(run_id))

    def bookkeeping(self, run_id: str, final: Mapping[str, PatchOperation]) -> dict[str, Any]:
        """The document's own fields written with every patch: the run id, the expiry,
        and ``a`` (last write, while the run has not ended: the reconciler's index)."""
        ended = final.get(K.ENDED)
        return {
            _RUN: run_id,
            _EXPIRES: self.expiry(),
            _ACTIVE: DELETE_FIELD if ended is not None and ended.op == "set" else _now(),
        }

    async def stalled(self, older_than_seconds: float, limit: int) -> list[str]:
        """Runs still running (not ended, not waiting for a resume) whose document has
        not been written for ``older_than_seconds``: one query on ``a`` (only runs that
        have not ended have it), reading just each run's id and status. A run found
        ended (a late branch wrote after its end) loses its ``a``."""
        cutoff = _now() - dt.timedelta(seconds=older_than_seconds)
        status_path = _path(_field_name(K.STATUS)[0])
        query = (
            self.clients.firestore()
            .collection(self.collection)
            .where(filter=FieldFilter(_ACTIVE, "<", cutoff))
            .select([_RUN, status_path])
            .limit(limit)
        )
        self.clients.count("firestore.query")
        found: list[str] = []
        async for snapshot in query.stream():
            data = snapshot.to_dict() or {}
            text = (data.get(_MAP) or {}).get(_field_name(K.STATUS)[0])
            record = self.serializer.loads(text) if text is not None else None
            status = record.get("status") if isinstance(record, dict) else None
            if status in ("completed", "failed", "cancelled"):
                self.clients.count("firestore.commit")
                await snapshot.reference.update({_ACTIVE: DELETE_FIELD})
            elif status != "awaiting" and data.get(_RUN):
                found.append(str(data[_RUN]))
        return found

    def expiry(self) -> dt.datetime:
        return _now() + dt.timedelta(seconds=self.state_ttl_seconds)


class FirestoreContext(BatchReadContext):
    """The state of run ``run_id`` in a :class:`RunCollection` (see the module docs)."""

    __slots__ = ("_local", "_snapshot", "run_id", "runs")

    def __init__(self, runs: RunCollection, run_id: str) -> None:
        self.runs = runs
        self.run_id = run_id
        self._snapshot: _Snapshot | None = None
        self._local = runs.local(run_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(run_id={self.run_id!r}, collection={self.runs.collection!r})"

    # ------------------------------------------------------------ reads

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        """The keys present among ``keys``: one partial read of just their fields."""
        if not keys:
            return {}
        wanted = list(dict.fromkeys(keys))
        snapshot = await self._read(wanted)
        loads = self.runs.serializer.loads
        found: dict[str, Any] = {}
        for key in wanted:
            text = snapshot.texts.get(key)
            if text is not None:
                found[key] = loads(text)
        return found

    async def to_dict(self) -> dict[str, Any]:
        """The whole state: one read of the document (finalization only)."""
        self.runs.clients.count("firestore.get")
        snapshot = await self.runs.document(self.run_id).get()
        if not snapshot.exists:
            return {}
        stored: Mapping[str, Any] = (snapshot.to_dict() or {}).get(_MAP) or {}
        loads = self.runs.serializer.loads
        state: dict[str, Any] = {}
        for name, text in stored.items():
            key, value_text = _decode_entry(name, text, loads)
            state[key] = loads(value_text)
        # Firestore hands a map's entries out in no fixed order: sort, so two readings
        # of one state (a finalizer redone, a republication) are the same JSON.
        return dict(sorted(state.items()))

    async def _read(self, keys: Sequence[str]) -> _Snapshot:
        """One partial read of ``keys`` (and of the run's end marker, which every fenced
        write guards on, at no extra cost); remembered for a guarded patch that follows.
        Reads that saw the same version of the document add up."""
        wanted = list(keys) if K.ENDED in keys else [*keys, K.ENDED]
        names = {key: _field_name(key) for key in wanted}
        local_writes = self._local.writes
        self.runs.clients.count("firestore.get")
        snapshot = await self.runs.document(self.run_id).get(
            field_paths=[_path(name) for name, _ in names.values()]
        )
        stored: Mapping[str, Any] = (snapshot.to_dict() or {}).get(_MAP) or {}
        texts: dict[str, str | None] = {}
        loads = self.runs.serializer.loads
        for key, (name, hashed) in names.items():
            text = stored.get(name)
            if text is not None and hashed:
                stored_key, text = _decode_entry(name, text, loads)
                if stored_key != key:  # a sha256 collision: never in practice
                    text = None
            texts[key] = text
        read = _Snapshot(snapshot.exists, snapshot.update_time, texts, local_writes)
        before = self._snapshot
        if (
            before is not None
            and before.exists == read.exists
            and before.update_time == read.update_time
            and before.local_writes == read.local_writes
        ):
            read.texts = {**before.texts, **texts}
        self._snapshot = read
        return read

    # ------------------------------------------------------------ writes

    async def patch(
        self,
        ops: Sequence[PatchOperation],
        *,
        guard: Guard | None = None,
    ) -> bool:
        """Apply ``ops`` atomically (the last operation on a key wins) in one write.

        With ``guard``: only if every ``key -> expected`` holds (None: absent), checked
        and written atomically through the ``update_time`` precondition; returns False
        (writing nothing) when it does not hold.

        Raises:
            StateLimitError: the patch or the resulting state does not fit in the run's
                document; nothing is written.
        """
        check_guard(guard)
        final: dict[str, PatchOperation] = {}
        for op in ops:
            final[op.key] = op
        if not final and not guard:
            return True
        entries, texts = self._encode(final)
        if guard:
            return await self._guarded(entries, texts, final, guard)
        own = self.runs.bookkeeping(self.run_id, final)
        data: dict[str, Any] = {_MAP: dict(entries), **own}
        merge = [FieldPath(_MAP, name) for name in entries] + [FieldPath(name) for name in own]
        self._snapshot = None
        self.runs.clients.count("firestore.commit")
        try:
            # merge= takes field paths too (the stub says bool only).
            await self.runs.document(self.run_id).set(data, merge=cast(Any, merge))
        except google_errors.InvalidArgument as exc:
            raise self._refused(exc, final) from exc
        self._local.writes += 1
        return True

    def _encode(
        self, final: Mapping[str, PatchOperation]
    ) -> tuple[dict[str, Any], dict[str, str | None]]:
        """Field name -> stored text (or DELETE_FIELD), and key -> value JSON text (None:
        deleted); refuses a patch that cannot fit."""
        dumps = self.runs.serializer.dumps
        entries: dict[str, Any] = {}
        texts: dict[str, str | None] = {}
        size = 0
        largest = ("", 0)
        for key, op in final.items():
            name, hashed = _field_name(key)
            if op.op == "delete":
                check_key(key)
                entries[name] = DELETE_FIELD
                texts[key] = None
                continue
            # Names the key in a SerializationError (NaN, lone surrogates, too deep).
            text = texts[key] = encode_value(key, op.value, self.runs.serializer)
            if hashed:
                text = dumps([key, text])
            entries[name] = text
            # Firestore counts a string as its UTF-8 bytes + 1, a field name likewise.
            entry_size = len(name.encode("utf-8")) + len(text.encode("utf-8")) + 2
            size += entry_size
            if entry_size > largest[1]:
                largest = (key, entry_size)
        if size > self.runs.max_state_bytes:
            raise StateLimitError(
                f"run {self.run_id!r}: a patch of {size:,} bytes cannot fit in the run's "
                f"Firestore document (limit {self.runs.max_state_bytes:,} bytes; largest "
                f"key {_short(largest[0])} with {largest[1]:,} bytes). Keep large values "
                "outside the context (Cloud Storage) and store a reference."
            )
        return entries, texts

    def _refused(
        self, exc: google_errors.GoogleAPICallError, final: Mapping[str, PatchOperation]
    ) -> Exception:
        """Firestore's refusal of a write as flowcraft's error: too large -> StateLimitError."""
        message = str(exc.message or exc)
        if "size" in message or "maximum" in message or "entity" in message:
            largest = max(
                (k for k, op in final.items() if op.op == "set"),
                key=lambda k: len(self.runs.serializer.dumps(final[k].value)),
                default="",
            )
            return StateLimitError(
                f"run {self.run_id!r}: Firestore refused the write: the state would pass "
                f"1 MiB per document (largest key in this patch: {_short(largest)}): {message}"
            )
        return exc

    async def _guarded(
        self,
        entries: Mapping[str, Any],
        written: Mapping[str, str | None],
        final: Mapping[str, PatchOperation],
        guard: Guard,
    ) -> bool:
        """Check ``guard`` and write ``entries`` in one precondition-guarded write."""
        async with self._local.lock:
            return await self._guarded_locked(entries, written, final, guard)

    async def _guarded_locked(
        self,
        entries: Mapping[str, Any],
        written: Mapping[str, str | None],
        final: Mapping[str, PatchOperation],
        guard: Guard,
    ) -> bool:
        ref = self.runs.document(self.run_id)
        local = self._local
        snapshot = self._snapshot
        if snapshot is not None and (
            snapshot.local_writes != local.writes or not all(k in snapshot.texts for k in guard)
        ):
            snapshot = None  # this process wrote since (the precondition would fail)
        fresh = snapshot is None
        for round_ in range(_GUARD_ROUNDS):
            if snapshot is None:
                snapshot = await self._read(list(guard))
                fresh = True
            if not self._holds(guard, snapshot):
                if fresh:
                    return False
                snapshot = None  # what we remembered is old: look again
                continue
            self.runs.clients.count("firestore.commit")
            self._snapshot = None
            try:
                if snapshot.exists:
                    updates = {_path(name): value for name, value in entries.items()}
                    updates.update(self.runs.bookkeeping(self.run_id, final))
                    option = FirestoreAsyncClient.write_option(
                        last_update_time=snapshot.update_time
                    )
                    result = await ref.update(updates, option=option)
                else:
                    created = {n: v for n, v in entries.items() if v is not DELETE_FIELD}
                    own = self.runs.bookkeeping(self.run_id, final)
                    document = {k: v for k, v in own.items() if v is not DELETE_FIELD}
                    result = await ref.create({_MAP: created, **document})
            except (
                google_errors.FailedPrecondition,
                google_errors.AlreadyExists,
                google_errors.NotFound,
            ):
                # Another process wrote between the read and ours: read again. Firestore
                # answers at once, so a short random pause spreads racing writers.
                snapshot = None
                await asyncio.sleep(random.uniform(0, 0.002 * (round_ + 1)))
                continue
            except google_errors.InvalidArgument as exc:
                raise self._refused(exc, final) from exc
            # The document is now what we read plus our ops: remember it, so a next
            # guarded patch of this context needs no read.
            local.writes += 1
            texts = dict(snapshot.texts)
            texts.update(written)
            self._snapshot = _Snapshot(True, result.update_time, texts, local.writes)
            return True
        raise RetryJob(
            f"run {self.run_id!r}: a guarded patch lost {_GUARD_ROUNDS} races for the run's "
            "document in a row; delivering the job again later"
        )

    def _holds(self, guard: Guard, snapshot: _Snapshot) -> bool:
        loads = self.runs.serializer.loads
        stored = {k: loads(t) for k in guard if (t := snapshot.texts.get(k)) is not None}
        return guard_holds(stored, guard)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _decode_entry(name: str, text: str, loads: Any) -> tuple[str, str]:
    """(key, value JSON text) of a stored map entry."""
    if name.startswith(_HASHED):
        key, value_text = loads(text)
        return str(key), str(value_text)
    return name[len(_PLAIN) :], text


def _short(key: str, limit: int = 60) -> str:
    return repr(key if len(key) <= limit else key[:limit] + "...")
