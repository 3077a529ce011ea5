"""What a run's history holds: one row per event, each with an identity in its run."""

from __future__ import annotations

import itertools
import json
import json.encoder
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from flowcraft.events import FlowEvent

SCHEMA_VERSION = 1
"""The history tables' layout. A store refuses tables of another version instead of
guessing (there is no migration yet)."""

FINAL = frozenset({"completed", "failed", "cancelled"})


class HistoryError(Exception):
    """The history store cannot be used (another schema version, a bad name)."""


@dataclass(slots=True)
class HistoryEvent:
    """One recorded event. ``key`` is its identity within the run: the same event
    emitted again (a redelivered job redoing a node) has the same key, and the store
    keeps the first. ``at`` is the emitting process's clock (Unix seconds); ``seq``
    the store's insertion order (0 until stored)."""

    run_id: str
    kind: str
    key: str
    node_id: str | None = None
    activation: int | None = None
    attempt: int | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    at: float = 0.0
    worker: str = ""
    seq: int = 0
    text: str | None = field(default=None, compare=False, repr=False)
    """``data`` as ASCII JSON, once something needed it (the spool): stores reuse it."""

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "nodeId": self.node_id,
            "activation": self.activation,
            "attempt": self.attempt,
            "key": self.key,
            "worker": self.worker,
            "data": dict(self.data),
        }


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run as its history knows it: ``status`` is the latest status an event gave
    (``running`` until one did)."""

    run_id: str
    blueprint_id: str | None
    status: str
    started_at: float
    updated_at: float

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "blueprintId": self.blueprint_id,
            "status": self.status,
            "startedAt": self.started_at,
            "updatedAt": self.updated_at,
        }


@runtime_checkable
class HistoryStore(Protocol):
    """Where history is kept. ``write`` inserts each event unless its run already
    holds one with the same key (insert-if-absent) and returns how many it inserted."""

    async def write(self, events: list[HistoryEvent]) -> int: ...

    async def events(self, run_id: str) -> list[HistoryEvent]: ...

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[RunSummary]: ...

    async def aclose(self) -> None: ...


_UNIQUE = uuid.uuid4().hex[:16]  # this process's events: a prefix no other process has
_COUNTER = itertools.count()

# Events that describe a run as a whole, once (or once per status): their key needs
# no node or activation.
_RUN_LEVEL = frozenset({"workflow:start", "workflow:finish", "workflow:stall", "workflow:pause"})
# Events that happen once per attempt of an activation, not once per activation.
_PER_ATTEMPT = frozenset({"node:start", "node:retry", "node:fallback"})


def event_key(event: FlowEvent) -> str:
    """The event's identity in its run.

    * ``data["eventId"]`` (a str), if the emitter gives one;
    * run-level events: the kind (``workflow:finish`` and ``workflow:pause`` with
      their status or waiting nodes);
    * events naming an ``activation``: kind, node, activation, the attempt for
      per-attempt kinds, and what tells several of one activation apart (a
      ``context:change``'s key, an ``edge:evaluate``'s target and condition);
    * anything else (``job:*``, kinds this version does not know): unique, so each
      is kept (a redelivery's job events are what happened to the job, not repeats).
    """
    found = stable_key(event.type, event.node_id, event.data)
    return found if found is not None else f"{event.type}\x1f{_UNIQUE}{next(_COUNTER)}"


def stable_key(kind: str, node_id: str | None, data: Mapping[str, Any]) -> str | None:
    """:func:`event_key` when the event itself gives its identity; None for an event
    that is unique each time it is emitted (the caller makes a unique key)."""
    explicit = data.get("eventId")
    if isinstance(explicit, str):
        return f"id\x1f{explicit}"
    if kind in _RUN_LEVEL:
        if kind == "workflow:finish":
            return f"{kind}\x1f{data.get('status', '')}"
        if kind == "workflow:pause":
            return f"{kind}\x1f{_dumps(data.get('awaiting'))}"
        return kind
    activation = data.get("activation")
    if isinstance(activation, int) and not isinstance(activation, bool):
        part = ""
        if kind in _PER_ATTEMPT:
            part = str(data.get("attempt", ""))
        elif kind == "context:change":
            part = str(data.get("key", ""))
        elif kind == "edge:evaluate":
            part = f"{data.get('target', '')}\x1f{data.get('condition', '')}"
        return f"{kind}\x1f{node_id or ''}\x1f{activation}\x1f{part}"
    return None


def record_of(event: FlowEvent, worker: str = "", at: float | None = None) -> HistoryEvent:
    """The history row of ``event`` (stamped now unless ``at`` is given)."""
    data = event.data
    activation = data.get("activation")
    attempt = data.get("attempt")
    return HistoryEvent(
        run_id=event.run_id,
        kind=event.type,
        key=event_key(event),
        node_id=event.node_id,
        activation=activation if type(activation) is int else None,
        attempt=attempt if type(attempt) is int else None,
        data=data,
        at=time.time() if at is None else at,
        worker=worker,
    )


def blueprint_of(event: HistoryEvent) -> str | None:
    """The blueprint a run-level event names, if any (the start, recorded where the
    run was started; the finish, recorded by the worker that finished it)."""
    if event.kind not in ("workflow:start", "workflow:finish"):
        return None
    found = event.data.get("blueprintId")
    return str(found) if found is not None else None


_RUNNING = frozenset(
    {"workflow:start", "workflow:resume", "node:wake", "node:signal", "node:timeout"}
)
# A run on a fleet says it waits through its nodes (the in-process runtime also
# emits workflow:pause).
_AWAITING = frozenset({"workflow:pause", "node:awaiting", "node:sleep"})


def status_of(event: HistoryEvent) -> str | None:
    """The run status an event gives, if any."""
    kind = event.kind
    if kind in _RUNNING:
        return "running"
    if kind in _AWAITING:
        return "awaiting"
    if kind == "workflow:finish":
        status = event.data.get("status")
        return str(status) if status is not None else None
    return None


_STATUS_CASE = (
    "status = CASE WHEN excluded.status = '' THEN r.status "
    "WHEN r.status IN ('completed', 'failed', 'cancelled') "
    "AND excluded.status NOT IN ('completed', 'failed', 'cancelled') THEN r.status "
    "WHEN excluded.status IN ('completed', 'failed', 'cancelled') "
    "AND r.status NOT IN ('completed', 'failed', 'cancelled') THEN excluded.status "
    "WHEN excluded.status_at >= r.status_at THEN excluded.status ELSE r.status END"
)
"""A runs-table upsert's new status (``{status_case}`` in a store's SQL): the rule of
:func:`later_status`, the same text on SQLite and PostgreSQL."""


def later_status(old: str, old_at: float, new: str, new_at: float) -> bool:
    """Whether ``new`` (given at ``new_at``) replaces a run's ``old`` status: the
    later one, but a final status stays (an event of a duplicate job after the end)
    and wins over any other (whatever the clocks of the processes say); in SQL,
    ``_STATUS_CASE``."""
    if old in FINAL and new not in FINAL:
        return False
    if new in FINAL and old not in FINAL:
        return True
    return new_at >= old_at


def _default(value: Any) -> Any:
    """What JSON cannot hold is kept as its repr: history is for reading, not for
    rebuilding objects."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=_default)


def _dumps(value: Any) -> str:
    try:
        return _ENCODER.encode(value)
    except ValueError:  # a circular structure, or NaN where allow_nan would be refused
        return json.dumps(repr(value))


_ASCII = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=_default)


def _one_shot_ascii() -> Callable[[Any, int], Any] | None:
    """The C encoder ``_ASCII.encode`` builds on every call, built once: an event's
    data is encoded on the job path (the spool), where that set-up was a third of
    the cost. No circular check (a circular structure recurses until
    ``RecursionError``, then takes the slow path); None without the C accelerator."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        made: Callable[[Any, int], Any] = make(
            None, _default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
        )
    except TypeError:  # another Python's signature
        return None
    return made


_FAST_ASCII = _one_shot_ascii()


def dumps_data(data: Mapping[str, Any], *, plain: bool = False) -> str:
    """An event's data as JSON text; unless ``plain``, all ASCII (any store takes it,
    lone surrogates included)."""
    if plain:
        return _dumps(data)
    if _FAST_ASCII is not None:
        try:
            return "".join(_FAST_ASCII(data, 0))
        except (ValueError, RecursionError):
            pass  # NaN is fine here; a circular structure is not: as below
    try:
        return _ASCII.encode(data)
    except ValueError:
        return json.dumps(repr(data))


def rows_of(events: list[HistoryEvent], *, plain: bool) -> list[tuple[Any, ...]]:
    """The events as rows: (run, key, kind, node, activation, attempt, at, worker,
    data). ``plain``: as they are (fast; a store may refuse what UTF-8 cannot encode),
    else every text made safe (:func:`clean`)."""
    if plain:
        return [
            (
                e.run_id,
                e.key,
                e.kind,
                e.node_id,
                e.activation,
                e.attempt,
                e.at,
                e.worker,
                e.text if e.text is not None else _dumps(e.data),
            )
            for e in events
        ]
    return [
        (
            clean(e.run_id),
            clean(e.key),
            clean(e.kind),
            None if e.node_id is None else clean(e.node_id),
            e.activation,
            e.attempt,
            e.at,
            clean(e.worker),
            e.text if e.text is not None else dumps_data(e.data),
        )
        for e in events
    ]


def loads_data(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {"value": value}


def check_name(name: str) -> str:
    """A table name prefix: letters, digits and underscores only (it is an identifier
    in the SQL, never a parameter)."""
    if (
        not name
        or not (name[0].isalpha() or name[0] == "_")
        or not all(c.isascii() and (c.isalnum() or c == "_") for c in name)
    ):
        raise HistoryError(f"table prefix {name!r}: use letters, digits and underscores")
    return name


class Statements:
    """A store's SQL, its table names filled in once (names checked by
    :func:`check_name`; every value is a parameter)."""

    def __init__(self, templates: Mapping[str, str], prefix: str) -> None:
        names = {"events": f"{prefix}_events", "runs": f"{prefix}_runs", "meta": f"{prefix}_meta"}
        self.tables = names
        for name, template in templates.items():
            setattr(self, name, template.format(**names, status_case=_STATUS_CASE))

    def __getattr__(self, name: str) -> str:
        raise AttributeError(name)  # pragma: no cover (only set names are read)


_CHUNK = 64
"""Rows per statement of :func:`execute_rows` (64 rows of 9 values: below the 999
parameters old SQLite builds allow)."""
_CHUNKED: dict[tuple[str, int], str] = {}


def execute_rows(conn: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """``conn.executemany(sql, rows)`` on SQLite, in statements of 64, 32, ... 1 rows
    (``sql``: an INSERT with one ``VALUES (?, ...)`` row). The sqlite3 module lets go
    of the GIL around each statement's step: row by row, the store's thread and the
    event loop's passed the GIL back and forth twice per row, hundreds of times a
    batch (on a busy machine each time waiting to be scheduled); so, a few times."""
    done, total = 0, len(rows)
    size = _CHUNK
    while done < total:
        while size > total - done:
            size //= 2
        statement = _CHUNKED.get((sql, size)) or _chunked(sql, size)
        end = done + size
        while end <= total:
            conn.execute(statement, [value for row in rows[done:end] for value in row])
            done, end = end, end + size


def _chunked(sql: str, size: int) -> str:
    start = sql.index("VALUES (") + len("VALUES ")
    end = sql.index(")", start) + 1
    made = _CHUNKED[(sql, size)] = sql[:start] + ",".join([sql[start:end]] * size) + sql[end:]
    return made


def clean(text: str) -> str:
    """Text any store takes: a NUL escaped as in JSON (PostgreSQL refuses it), a lone
    surrogate as a backslash escape (UTF-8 cannot encode it). Ids and keys are stored,
    and looked up, this way."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text
