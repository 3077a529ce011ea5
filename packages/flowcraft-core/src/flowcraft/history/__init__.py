"""Run history: every event of every run, kept in a store, read back as a timeline,
as steps, and as the run's context at any step (time travel).

Record by giving a :class:`HistoryRecorder` as the event bus of a ``FlowRuntime`` or
an adapter (and, on a fleet, ``recorder.instrument(adapter)``); read with
:class:`History`. Stores: :class:`SqliteHistoryStore` (a file, no server) and
:class:`PostgresHistoryStore` (the ``[postgres]`` extra, for fleets).
A machine's workers can leave the store's work to one :class:`SpoolDrainer`
(``flowcraft history drain``). ``flowcraft history RUN`` prints a run's timeline.
Stores cap each stored value at ``max_value_bytes`` (a :class:`Truncated` marker
stands for a larger one) and ``purge`` old or given runs (``flowcraft history
purge``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowcraft.history._cap import DEFAULT_MAX_VALUE_BYTES, TRUNCATED_KEY, Truncated, truncated
from flowcraft.history._drain import SpoolDrainer
from flowcraft.history._purge import PurgeResult
from flowcraft.history._reader import (
    History,
    RebuiltContext,
    Step,
    open_store,
    recent_runs,
    validate_store_url,
)
from flowcraft.history._recorder import HistoryRecorder
from flowcraft.history._records import (
    SCHEMA_VERSION,
    HistoryError,
    HistoryEvent,
    HistoryStore,
    RunSummary,
    event_key,
)
from flowcraft.history._sqlite import SqliteHistoryStore

if TYPE_CHECKING:
    from flowcraft.history._postgres import PostgresHistoryStore


def __getattr__(name: str) -> object:
    # Lazy: asyncpg is an optional extra.
    if name == "PostgresHistoryStore":
        from flowcraft.history._postgres import PostgresHistoryStore

        return PostgresHistoryStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_VALUE_BYTES",
    "SCHEMA_VERSION",
    "TRUNCATED_KEY",
    "History",
    "HistoryError",
    "HistoryEvent",
    "HistoryRecorder",
    "HistoryStore",
    "PostgresHistoryStore",
    "PurgeResult",
    "RebuiltContext",
    "RunSummary",
    "SpoolDrainer",
    "SqliteHistoryStore",
    "Step",
    "Truncated",
    "event_key",
    "open_store",
    "recent_runs",
    "truncated",
    "validate_store_url",
]
