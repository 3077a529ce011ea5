"""``flowcraft history``: a run's timeline from its recorded history, or recent runs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from flowcraft.cli import main
from flowcraft.history import History, HistoryStore, open_store
from flowcraft.history._reader import format_timeline, steps_of, summary_of

T = TypeVar("T")

DEFAULT_STORE = "flowcraft-history.db"


def _check_exists(where: str) -> None:
    """A SQLite file that is not there: say so (instead of creating an empty one)."""
    if where.startswith(("postgresql://", "postgres://")):
        return
    path = where.removeprefix("sqlite://")
    if path != where:
        path = path[1:] if path.startswith("//") else path.removeprefix("/")
    if path not in ("", ":memory:") and not Path(path).exists():
        raise click.ClickException(f"no history at {path} (--store, or FLOWCRAFT_HISTORY)")


async def _with_store(where: str, work: Any) -> Any:
    store = open_store(where)
    try:
        return await work(store)
    finally:
        await store.aclose()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


@main.command("history")
@click.argument("run_id", required=False, metavar="[RUN]")
@click.option(
    "--store",
    "where",
    envvar="FLOWCRAFT_HISTORY",
    default=DEFAULT_STORE,
    show_default=True,
    help="Where history is kept: a SQLite file, sqlite:///FILE or postgresql://... "
    "(env FLOWCRAFT_HISTORY).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout (for scripts).")
@click.option("--at", "step", type=int, metavar="STEP", help="Print the context after STEP.")
@click.option("--limit", default=20, show_default=True, help="Runs to list (without RUN).")
@click.option("--status", help="List only runs of this status (without RUN).")
def history(
    run_id: str | None, where: str, as_json: bool, step: int | None, limit: int, status: str | None
) -> None:
    """Print RUN's timeline (every recorded event), or its context at a step
    (--at); without RUN, list the most recently started runs with history."""
    _check_exists(where)
    if run_id is None:
        runs = _run(_with_store(where, lambda s: s.runs(limit=limit, status=status)))
        if as_json:
            click.echo(json.dumps({"runs": [r.to_json_dict() for r in runs]}))
            return
        for r in runs:
            began = datetime.fromtimestamp(r.started_at, UTC).isoformat(timespec="seconds")
            click.echo(f"{r.run_id}  {r.blueprint_id or '-'}  {r.status}  {began}")
        return

    async def read(store: HistoryStore) -> Any:
        events = await store.events(run_id)
        if not events:
            raise click.ClickException(f"no history for run {run_id!r} in {where}")
        if step is not None:
            try:
                return events, await History(store).context_at(run_id, step)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        return events, None

    events, context = _run(_with_store(where, read))
    if step is not None:
        if as_json:
            click.echo(
                json.dumps({"runId": run_id, "step": step, "context": context}, default=repr)
            )
        else:
            click.echo(json.dumps(context, indent=2, default=repr))
        return
    if as_json:
        body = {
            "run": summary_of(run_id, events).to_json_dict(),
            "steps": [s.to_json_dict() for s in steps_of(events)],
            "events": [e.to_json_dict() for e in events],
        }
        click.echo(json.dumps(body, default=repr))
        return
    click.echo(format_timeline(run_id, events))
