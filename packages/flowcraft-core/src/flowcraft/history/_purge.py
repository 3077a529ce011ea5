"""Purging history: which runs, and the SQL that both stores share in shape.

A purge picks runs from the runs table (by the time of their last event, by id, or
both; finished ones only unless told otherwise) and deletes them in batches: a
batch's events in chunks of ``batch_size`` rows, each chunk its own transaction,
then, in one transaction, the runs' rows (the selection checked again) and any
event that arrived meanwhile. A purge cut short leaves whole runs or runs whose rows
still select them: the next purge finishes them."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flowcraft.history._records import FINAL, clean

__all__ = ["PurgeResult", "Selection", "purge_statements"]

# Fixed SQL text from this module's constants, never from a caller.
_FINAL_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(FINAL)) + ")"


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What a purge deleted (or, with ``dry_run``, would delete): ``runs`` and their
    ``events``; ``kept_unfinished``: runs the selection named that were kept because
    they had not finished (0 with ``include_unfinished``)."""

    runs: int
    events: int
    kept_unfinished: int = 0
    dry_run: bool = False

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "events": self.events,
            "keptUnfinished": self.kept_unfinished,
            "dryRun": self.dry_run,
        }


@dataclass(frozen=True, slots=True)
class Selection:
    """The runs a purge deletes: last event before ``cutoff`` (Unix seconds), id in
    ``run_ids`` (as stored), finished unless ``include_unfinished``."""

    cutoff: float | None
    run_ids: list[str] | None
    include_unfinished: bool

    @classmethod
    def of(
        cls,
        older_than: timedelta | float | None,
        run_ids: Collection[str] | None,
        include_unfinished: bool,
        now: float | None,
    ) -> Selection:
        if older_than is None and run_ids is None:
            raise ValueError("purge needs older_than, run_ids or both")
        if isinstance(run_ids, str):
            raise TypeError("run_ids is a collection of run ids, not one string")
        cutoff = None
        if older_than is not None:
            seconds = (
                older_than.total_seconds()
                if isinstance(older_than, timedelta)
                else float(older_than)
            )
            if not seconds >= 0:
                raise ValueError(f"older_than must be 0 or more, not {older_than!r}")
            cutoff = (time.time() if now is None else now) - seconds
        ids = None if run_ids is None else list(dict.fromkeys(clean(r) for r in run_ids))
        return cls(cutoff, ids, include_unfinished)


_SQL = {
    "count_runs": "SELECT count(*) FROM {runs} WHERE {chosen}",
    "count_unfinished": "SELECT count(*) FROM {runs} WHERE {unfinished}",
    "count_events": "SELECT count(*) FROM {events} WHERE run_id IN "
    "(SELECT run_id FROM {runs} WHERE {chosen})",
    # The next batch of runs, the oldest first.
    "batch": "SELECT run_id FROM {runs} WHERE {chosen} ORDER BY updated_at LIMIT {limit}",
    # A chunk of the batch's events.
    "delete_chunk": "DELETE FROM {events} WHERE seq IN "
    "(SELECT seq FROM {events} WHERE {ids} LIMIT {chunk})",
    # Then the batch's runs still selected, and their events written meanwhile.
    "delete_runs": "DELETE FROM {runs} WHERE {ids} AND {rechecked} RETURNING run_id",
    "delete_rest": "DELETE FROM {events} WHERE {ids}",
}


@dataclass(frozen=True, slots=True)
class Dialect:
    """How a store writes the ``n``-th parameter and tests a run id against a list."""

    param: Callable[[int], str]
    in_ids: str  # with {p}: the list's parameter
    ids: Callable[[list[str]], Any]  # the list as that parameter's value


class PurgeStatements:
    """One purge's SQL for one store. Only table names (checked identifiers), fixed
    clauses and parameter placeholders make up the text; every value is a parameter."""

    def __init__(self, dialect: Dialect, tables: dict[str, str], selection: Selection) -> None:
        self.dialect = dialect
        status = None if selection.include_unfinished else "finished"
        chosen, self.args = self._where(selection, status)
        unfinished, self.unfinished_args = self._where(selection, "unfinished")
        rechecked, _ = self._where(selection, status, after=1)
        parts = {
            **tables,
            "chosen": chosen,
            "unfinished": unfinished,
            "rechecked": rechecked,
            "ids": dialect.in_ids.format(p=dialect.param(1)),
            "limit": dialect.param(len(self.args) + 1),
            "chunk": dialect.param(2),
        }
        self.count_runs = _SQL["count_runs"].format(**parts)
        self.count_unfinished = _SQL["count_unfinished"].format(**parts)
        self.count_events = _SQL["count_events"].format(**parts)
        self.batch = _SQL["batch"].format(**parts)
        self.delete_chunk = _SQL["delete_chunk"].format(**parts)
        self.delete_runs = _SQL["delete_runs"].format(**parts)
        self.delete_rest = _SQL["delete_rest"].format(**parts)

    def _where(
        self, selection: Selection, status: str | None, after: int = 0
    ) -> tuple[str, list[Any]]:
        """The selection as a WHERE clause (its parameters numbered from ``after + 1``)
        and its parameters; ``status``: finished, unfinished or either (None)."""
        param = self.dialect.param
        clauses: list[str] = []
        args: list[Any] = []
        if selection.cutoff is not None:
            args.append(selection.cutoff)
            clauses.append(f"updated_at < {param(after + len(args))}")
        if selection.run_ids is not None:
            args.append(self.dialect.ids(selection.run_ids))
            clauses.append(self.dialect.in_ids.format(p=param(after + len(args))))
        if status == "finished":
            clauses.append(f"status IN {_FINAL_SQL}")
        elif status == "unfinished":
            clauses.append(f"status NOT IN {_FINAL_SQL}")
        return " AND ".join(clauses), args


def purge_statements(
    dialect: Dialect, tables: dict[str, str], selection: Selection
) -> PurgeStatements:
    return PurgeStatements(dialect, tables, selection)
