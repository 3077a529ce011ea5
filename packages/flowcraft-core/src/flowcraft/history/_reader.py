"""Reading history: a run's steps, its context at any step, its timeline."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowcraft.history._cap import DEFAULT_MAX_VALUE_BYTES, Truncated, truncated
from flowcraft.history._records import (
    HistoryError,
    HistoryEvent,
    HistoryStore,
    RunSummary,
    blueprint_of,
    later_status,
    status_of,
)

__all__ = ["History", "RebuiltContext", "Step", "open_store", "recent_runs", "validate_store_url"]

OUTPUTS_PREFIX = "_outputs."

_RESOLUTIONS = {"node:finish": "finished", "node:skipped": "skipped", "node:error": "failed"}


@dataclass(slots=True)
class Step:
    """One resolved activation of a node, in the order the run resolved them.

    ``status`` is ``finished``, ``skipped``, ``failed`` or ``resumed`` (a wait node
    given its result). ``changes`` are its committed context writes, ``input`` what
    its last recorded attempt was given (None if no start was recorded).
    ``truncated`` names what the history did not keep (over the store's
    ``max_value_bytes``; that value is a marker): ``input``, ``output``,
    ``context['KEY']``."""

    index: int
    node_id: str
    activation: int
    status: str
    output: Any = None
    action: str | None = None
    error: str | None = None
    input: Any = None
    attempts: int = 0
    changes: list[dict[str, Any]] = field(default_factory=list)
    at: float = 0.0
    truncated: list[str] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "step": self.index,
            "nodeId": self.node_id,
            "activation": self.activation,
            "status": self.status,
            "output": self.output,
            "action": self.action,
            "error": self.error,
            "input": self.input,
            "attempts": self.attempts,
            "changes": self.changes,
            "at": self.at,
            "truncated": self.truncated,
        }


def steps_of(events: Iterable[HistoryEvent]) -> list[Step]:
    """A run's steps from its events (in recorded order)."""
    starts: dict[tuple[str, int], HistoryEvent] = {}
    attempts: dict[tuple[str, int], int] = {}
    changes: dict[tuple[str, int], list[dict[str, Any]]] = {}
    resolved: dict[tuple[str, int], Step] = {}
    resumes: list[tuple[tuple[str, int], HistoryEvent]] = []
    order: list[tuple[str, int]] = []
    for e in events:
        if e.node_id is None or e.activation is None:
            continue
        ident = (e.node_id, e.activation)
        if e.kind == "node:start":
            attempts[ident] = attempts.get(ident, 0) + 1
            previous = starts.get(ident)
            if previous is None or (e.attempt or 0) >= (previous.attempt or 0):
                starts[ident] = e
        elif e.kind == "context:change":
            changes.setdefault(ident, []).append(
                {
                    "op": e.data.get("op", "set"),
                    "key": e.data.get("key"),
                    "value": e.data.get("value"),
                }
            )
        elif e.kind in _RESOLUTIONS and ident not in resolved:
            action = e.data.get("action")
            error = e.data.get("error")
            resolved[ident] = Step(
                0,
                e.node_id,
                e.activation,
                _RESOLUTIONS[e.kind],
                output=e.data.get("output"),
                action=str(action) if action is not None else None,
                error=str(error) if error is not None else None,
                at=e.at,
            )
            order.append(ident)
        elif e.kind == "workflow:resume":
            resumes.append((ident, e))
    for ident, e in resumes:
        if ident in resolved:  # distributed: the resume's commit emitted node:finish too
            continue
        action = e.data.get("action")
        resolved[ident] = Step(
            0,
            ident[0],
            ident[1],
            "resumed",
            output=e.data.get("output"),
            action=str(action) if action is not None else None,
            at=e.at,
        )
        order.append(ident)
    order.sort(key=lambda i: resolved[i].at)
    steps = []
    for index, ident in enumerate(order, 1):
        step = resolved[ident]
        step.index = index
        start = starts.get(ident)
        if start is not None:
            step.input = start.data.get("input")
        step.attempts = attempts.get(ident, 0)
        step.changes = changes.get(ident, [])
        step.truncated = [
            *(["input"] if truncated(step.input) else []),
            *(["output"] if truncated(step.output) else []),
            *(f"context[{c['key']!r}]" for c in step.changes if truncated(c["value"])),
        ]
        steps.append(step)
    return steps


def initial_context(events: Iterable[HistoryEvent]) -> dict[str, Any]:
    for e in events:
        if e.kind == "workflow:start":
            context = e.data.get("context")
            return dict(context) if isinstance(context, dict) else {}
    return {}


def apply_step(context: dict[str, Any], step: Step) -> None:
    """What a step committed: its context writes, then its output (as the runtime does)."""
    for change in step.changes:
        key = str(change.get("key"))
        if change.get("op") == "delete":
            context.pop(key, None)
        else:
            context[key] = change.get("value")
    if step.status in ("finished", "resumed"):
        context[OUTPUTS_PREFIX + step.node_id] = step.output


class RebuiltContext(dict[str, Any]):
    """A run's context rebuilt from its history. ``truncated``: the keys whose value
    the history did not keep (each holds the marker; its size and hash here), so
    their value here is not the run's."""

    __slots__ = ("truncated",)

    def __init__(self, values: dict[str, Any]) -> None:
        super().__init__(values)
        self.truncated: dict[str, Truncated] = {
            k: t for k, v in values.items() if (t := truncated(v)) is not None
        }


class History:
    """Read a store's history: a run's events, steps, context at a step, timeline."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    async def events(self, run_id: str) -> list[HistoryEvent]:
        return await self.store.events(run_id)

    async def steps(self, run_id: str) -> list[Step]:
        """The run's resolved activations in order: step 1 is the first."""
        return steps_of(await self.store.events(run_id))

    async def context_at(self, run_id: str, step: int | None = None) -> RebuiltContext:
        """The run's context right after ``step`` (0: its initial context; None: after
        its last step), rebuilt from its history: time travel. Raises ``ValueError``
        for a step the run does not have (or ``LookupError`` for a run with no history).
        A value the store did not keep (too large) is its marker, and its key is in
        the result's ``truncated``."""
        events = await self.store.events(run_id)
        if not events:
            raise LookupError(f"no history for run {run_id!r}")
        steps = steps_of(events)
        if step is None:
            step = len(steps)
        if not 0 <= step <= len(steps):
            raise ValueError(f"run {run_id!r} has steps 0 to {len(steps)}, not {step}")
        context = initial_context(events)
        for s in steps[:step]:
            apply_step(context, s)
        return RebuiltContext(context)

    async def recent_runs(self, limit: int = 20, *, status: str | None = None) -> list[RunSummary]:
        """The most recently started runs with history (of ``status``, if given)."""
        return await self.store.runs(limit=limit, status=status)

    async def timeline(self, run_id: str) -> str:
        """The run's events as text, one line each, for people."""
        return format_timeline(run_id, await self.store.events(run_id))


def format_timeline(run_id: str, events: list[HistoryEvent]) -> str:
    if not events:
        return f"run {run_id}: no history"
    t0 = events[0].at
    status = "running"
    for e in events:
        if e.kind == "workflow:finish":
            status = str(e.data.get("status", status))
    blueprint = next((b for e in events if (b := blueprint_of(e)) is not None), None)
    began = datetime.fromtimestamp(t0, UTC).isoformat(timespec="milliseconds")
    lines = [f"run {run_id}  blueprint {blueprint}  {status}  started {began}"]
    for e in events:
        where = e.node_id or ""
        if e.activation is not None and e.activation != 1:
            where += f"#{e.activation}"
        if e.attempt is not None and e.attempt != 1:
            where += f" attempt {e.attempt}"
        lines.append(f"  +{e.at - t0:8.3f}s  {e.kind:<16} {where:<20} {_detail(e)}".rstrip())
    return "\n".join(lines)


def _detail(e: HistoryEvent) -> str:
    data = e.data
    if e.kind == "workflow:start":
        return f"context={_short(data.get('context', {}))}"
    if e.kind == "workflow:finish":
        errors = data.get("errors") or []
        return f"{data.get('status')}" + (f" errors={_short(errors)}" if errors else "")
    if e.kind == "node:start":
        return f"input={_short(data.get('input'))}"
    if e.kind in ("node:finish", "workflow:resume"):
        text = f"output={_short(data.get('output'))}"
        if data.get("action") is not None:
            text += f" action={data['action']}"
        return text
    if e.kind == "context:change":
        if data.get("op") == "delete":
            return f"delete {data.get('key')}"
        return f"{data.get('key')} = {_short(data.get('value'))}"
    if e.kind == "edge:evaluate":
        return f"-> {data.get('target')} if {data.get('condition')}: {data.get('result')}"
    if e.kind in ("node:error", "node:retry", "job:failed"):
        return str(data.get("error", ""))[:120]
    rest = {k: v for k, v in data.items() if k not in ("activation", "attempt")}
    return _short(rest) if rest else ""


def _short(value: Any, width: int = 60) -> str:
    marker = truncated(value)
    if marker is not None:
        return str(marker)
    if isinstance(value, dict) and any(truncated(v) for v in value.values()):
        value = {k: str(t) if (t := truncated(v)) else v for k, v in value.items()}
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)
    return text if len(text) <= width else text[: width - 3] + "..."


def validate_store_url(where: str) -> None:
    """Refuse a URL that no store takes, without opening anything (:class:`HistoryError`,
    naming only its scheme: the rest may hold a password); :func:`open_store` checks
    the same, so settings can be checked before a store is wanted."""
    scheme, found, _ = where.partition("://")
    if found and scheme not in ("sqlite", "postgresql", "postgres") and scheme.isalnum():
        raise HistoryError(
            f"history store {scheme}://...: give a SQLite file, sqlite:///PATH or postgresql://"
        )


def open_store(
    where: str | Path, *, max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES
) -> HistoryStore:
    """The store at ``where``: a ``postgresql://`` (or ``postgres://``) URL, a
    ``sqlite:///path`` URL, or a file path (SQLite); ``max_value_bytes`` as the
    stores take it."""
    text = str(where)
    if text.startswith(("postgresql://", "postgres://")):
        from flowcraft.history._postgres import PostgresHistoryStore

        return PostgresHistoryStore(text, max_value_bytes=max_value_bytes)
    from flowcraft.history._sqlite import SqliteHistoryStore

    validate_store_url(text)
    if text.startswith("sqlite://"):
        text = text[len("sqlite://") :]
        if text.startswith("/") and not text.startswith("//"):
            text = text[1:] or ":memory:"  # sqlite:///relative.db, sqlite:////abs/path.db
        else:
            text = text[1:]
    return SqliteHistoryStore(text, max_value_bytes=max_value_bytes)


async def recent_runs(
    where: str | Path | HistoryStore, limit: int = 20, *, status: str | None = None
) -> list[RunSummary]:
    """The most recently started runs whose history is kept at ``where`` (a store, or
    what :func:`open_store` takes), newest first."""
    if not isinstance(where, (str, Path)):
        given: HistoryStore = where
        return await given.runs(limit=limit, status=status)
    store = open_store(where)
    try:
        return await store.runs(limit=limit, status=status)
    finally:
        await store.aclose()


def summary_of(run_id: str, events: list[HistoryEvent]) -> RunSummary:
    """A run's summary from its events (what the store's runs table says of it)."""
    blueprint = None
    status, status_at = "running", -1.0
    for e in events:
        blueprint = blueprint or blueprint_of(e)
        given = status_of(e)
        if given is not None and later_status(status, status_at, given, e.at):
            status, status_at = given, max(status_at, e.at)
    started = events[0].at if events else 0.0
    updated = events[-1].at if events else 0.0
    return RunSummary(run_id, blueprint, status, started, updated)
