"""The size cap on stored values: a value too large to keep is stored as a marker
with its size and hash, so a reader knows it is missing instead of rebuilding a
wrong context from it."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from flowcraft.history._records import HistoryEvent, dumps_data

__all__ = ["DEFAULT_MAX_VALUE_BYTES", "TRUNCATED_KEY", "Truncated", "cap_events", "truncated"]

DEFAULT_MAX_VALUE_BYTES = 1 << 20
"""A store keeps values up to 1 MiB of JSON each unless told otherwise."""

TRUNCATED_KEY = "$flowcraft.truncated"
"""The one key of a marker: ``{"$flowcraft.truncated": {"bytes": N, "sha256": H}}``."""

# Keys of an event's data whose value is a mapping of context keys: each capped alone.
_PER_KEY = frozenset({"context"})
# What identifies an event, its run's blueprint and status, or an edge: always kept
# (a marker there would make the run unreadable), whatever the cap.
_NEVER = frozenset(
    {
        "action",
        "activation",
        "attempt",
        "blueprintId",
        "condition",
        "event",
        "eventId",
        "key",
        "status",
        "target",
        "token",
    }
)


@dataclass(frozen=True, slots=True)
class Truncated:
    """A value the history did not keep: ``bytes`` its JSON's length (non-ASCII
    escaped, as stored), ``sha256`` that JSON's hash (to compare a value with it)."""

    bytes: int
    sha256: str

    def matches(self, value: Any) -> bool:
        """Whether ``value`` encodes to the JSON this marker stands for."""
        text = encode_value(value)
        return len(text) == self.bytes and _digest(text) == self.sha256

    def to_json_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}

    def __str__(self) -> str:
        return f"<not kept: {self.bytes} bytes, sha256 {self.sha256[:12]}>"


def truncated(value: Any) -> Truncated | None:
    """The marker's details if ``value`` is a stored marker, else None."""
    if type(value) is dict and len(value) == 1:
        inner = value.get(TRUNCATED_KEY)
        if isinstance(inner, dict):
            size, digest = inner.get("bytes"), inner.get("sha256")
            if type(size) is int and isinstance(digest, str):
                return Truncated(size, digest)
    return None


def encode_value(value: Any) -> str:
    """A value's JSON as the stores write it (ASCII, compact)."""
    # dumps_data encodes any value the same way, not only an event's data mapping.
    return dumps_data(cast(Mapping[str, Any], value))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("ascii", "backslashreplace")).hexdigest()


def _marker(text: str) -> dict[str, Any]:
    return {TRUNCATED_KEY: {"bytes": len(text), "sha256": _digest(text)}}


def _capped(value: Any, limit: int) -> tuple[Any, bool]:
    text = encode_value(value)
    if len(text) <= limit:
        return value, False
    return _marker(text), True


def cap_events(events: list[HistoryEvent], limit: int | None) -> list[HistoryEvent]:
    """``events`` with each value of their data (a node's input or output, a context
    write's value, each key of an initial context, an error) longer than ``limit``
    as JSON replaced by a marker; never what names the run's blueprint and status or
    the event itself. Each event's JSON (``text``) is made here, where
    the store would make it: an event whose whole data fits is left as it is."""
    if limit is None:
        return events
    out = []
    for e in events:
        text = e.text if e.text is not None else dumps_data(e.data)
        if len(text) <= limit:  # each value's JSON is part of the whole's
            e.text = text
            out.append(e)
            continue
        data: dict[str, Any] = {}
        changed = False
        for key, value in e.data.items():
            if key in _NEVER:
                data[key] = value
            elif key in _PER_KEY and isinstance(value, Mapping):
                inner = {}
                for k, v in value.items():
                    inner[k], was = _capped(v, limit)
                    changed = changed or was
                data[key] = inner
            else:
                data[key], was = _capped(value, limit)
                changed = changed or was
        if changed:
            out.append(dataclasses.replace(e, data=data, text=dumps_data(data)))
        else:
            e.text = text
            out.append(e)
    return out
