"""``flowcraft history``: a run's timeline from its recorded history, or recent runs;
``flowcraft history purge``: delete the history of old or given runs;
``flowcraft history drain``: store what a machine's workers spool."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click

from flowcraft.cli import EXIT_FAILED, BadInput, main
from flowcraft.history import (
    DEFAULT_MAX_VALUE_BYTES,
    History,
    HistoryError,
    HistoryStore,
    PurgeResult,
    open_store,
)
from flowcraft.history._reader import RebuiltContext, format_timeline, steps_of, summary_of

T = TypeVar("T")

DEFAULT_STORE = "flowcraft-history.db"


def _check_exists(where: str) -> None:
    """A SQLite file that is not there: say so (instead of creating an empty one)."""
    if where.startswith(("postgresql://", "postgres://")):
        return
    _open(where)  # an unknown URL scheme: bad input (never echoing the URL)
    path = where.removeprefix("sqlite://")
    if path != where:
        path = path[1:] if path.startswith("//") else path.removeprefix("/")
    if path not in ("", ":memory:") and not Path(path).exists():
        raise click.ClickException(f"no history at {path} (--store, or FLOWCRAFT_HISTORY)")


def _open(where: str, max_value_bytes: int | None = DEFAULT_MAX_VALUE_BYTES) -> HistoryStore:
    """The store at ``where``; a URL no store takes is bad input (exit 2)."""
    try:
        return open_store(where, max_value_bytes=max_value_bytes)
    except HistoryError as exc:
        raise BadInput(str(exc)) from None


async def _with_store(where: str, work: Any) -> Any:
    store = _open(where)
    try:
        return await work(store)
    finally:
        await store.aclose()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


class _StoreFailed(click.ClickException):
    """The history store refused or could not be reached: one line, exit 1."""

    exit_code = EXIT_FAILED


class _RunOrCommand(click.Group):
    """``history [RUN]`` with subcommands: a first argument that names no subcommand
    is a run id, shown by ``show`` (``history RUN`` is ``history show RUN``)."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands:
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


_STORE_HELP = (
    "Where history is kept: a SQLite file, sqlite:///FILE or postgresql://... "
    "(env FLOWCRAFT_HISTORY)."
)
_JSON_HELP = "One JSON object on stdout (for scripts)."


def _inherited(ctx: click.Context, name: str, given: Any) -> Any:
    """A subcommand's option, else the same option given before it (``history
    --store X purge``), else that option's default."""
    if given is not None and given is not False:
        return given
    parent = ctx.parent
    return parent.params.get(name) if parent is not None else given


@main.group(
    "history",
    cls=_RunOrCommand,
    invoke_without_command=True,
    subcommand_metavar="[RUN] | purge [ARGS]... | drain [ARGS]...",
)
@click.option(
    "--store",
    "where",
    envvar="FLOWCRAFT_HISTORY",
    default=DEFAULT_STORE,
    show_default=True,
    help=_STORE_HELP,
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.option("--at", "step", type=int, metavar="STEP", help="Print the context after STEP.")
@click.option("--limit", default=20, show_default=True, help="Runs to list (without RUN).")
@click.option("--status", help="List only runs of this status (without RUN).")
@click.pass_context
def history(
    ctx: click.Context,
    where: str,
    as_json: bool,
    step: int | None,
    limit: int,
    status: str | None,
) -> None:
    """Print RUN's timeline (every recorded event), or its context at a step
    (--at); without RUN, list the most recently started runs with history.
    `history purge` deletes the history of old or given runs; `history drain`
    stores the events a machine's workers append to their spool."""
    if ctx.invoked_subcommand is not None:
        return
    _check_exists(where)
    runs = _run(_with_store(where, lambda s: s.runs(limit=limit, status=status)))
    if as_json:
        click.echo(json.dumps({"runs": [r.to_json_dict() for r in runs]}))
        return
    for r in runs:
        began = datetime.fromtimestamp(r.started_at, UTC).isoformat(timespec="seconds")
        click.echo(f"{r.run_id}  {r.blueprint_id or '-'}  {r.status}  {began}")


@history.command("show")
@click.argument("run_id", metavar="RUN")
@click.option("--store", "where", help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.option("--at", "step", type=int, metavar="STEP", help="Print the context after STEP.")
@click.pass_context
def show(
    ctx: click.Context, run_id: str, where: str | None, as_json: bool, step: int | None
) -> None:
    """Print RUN's timeline, or its context after STEP (--at). A value the history
    did not keep (over the store's size cap) shows as not kept, with its size."""
    store_at: str = _inherited(ctx, "where", where)
    as_json = _inherited(ctx, "as_json", as_json)
    step = _inherited(ctx, "step", step)
    _check_exists(store_at)

    async def read(store: HistoryStore) -> Any:
        events = await store.events(run_id)
        if not events:
            raise click.ClickException(f"no history for run {run_id!r} in {store_at}")
        if step is not None:
            try:
                return events, await History(store).context_at(run_id, step)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        return events, None

    events, context = _run(_with_store(store_at, read))
    if step is not None:
        assert isinstance(context, RebuiltContext)
        lost = {k: t.to_json_dict() for k, t in context.truncated.items()}
        if as_json:
            body = {"runId": run_id, "step": step, "context": context, "truncated": lost}
            click.echo(json.dumps(body, default=repr))
        else:
            click.echo(json.dumps(context, indent=2, default=repr))
            for key, marker in context.truncated.items():
                click.echo(f"not kept in the history: {key!r} {marker}", err=True)
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


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\Z")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w``, or plain seconds."""
    found = _AGE.match(text.strip().lower())
    if found is None:
        raise BadInput(f"--older-than {text!r}: give a number and a unit, e.g. 30d, 12h, 90m")
    return timedelta(seconds=float(found.group(1)) * _UNIT_SECONDS[found.group(2) or "s"])


@history.command("purge")
@click.option("--store", "where", help=_STORE_HELP)
@click.option(
    "--older-than",
    "older_than",
    metavar="AGE",
    help="Runs whose last event is older than AGE (30d, 12h, 90m, 45s, 2w; plain: seconds).",
)
@click.option(
    "--run",
    "run_ids",
    multiple=True,
    metavar="RUN",
    help="This run (repeat for several); with --older-than, only if it is that old.",
)
@click.option(
    "--include-unfinished",
    is_flag=True,
    help="Purge runs that have not finished too (running, awaiting, stalled).",
)
@click.option("--dry-run", is_flag=True, help="Count what would be purged; delete nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows deleted per transaction.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.pass_context
def purge(
    ctx: click.Context,
    where: str | None,
    older_than: str | None,
    run_ids: tuple[str, ...],
    include_unfinished: bool,
    dry_run: bool,
    batch_size: int,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete the recorded history of runs whose last event is older than
    --older-than, of the runs given with --run, or both (given runs, if that old).
    Only runs that finished (completed, failed, cancelled) unless
    --include-unfinished."""
    store_at: str = _inherited(ctx, "where", where)
    as_json = _inherited(ctx, "as_json", as_json)
    if older_than is None and not run_ids:
        raise BadInput("purge what? give --older-than AGE, --run RUN, or both")
    age = parse_age(older_than) if older_than is not None else None
    _check_exists(store_at)
    what = _describe(age, run_ids, include_unfinished)
    if not (yes or dry_run) and not _confirmed(f"Delete the history of {what}?"):
        raise BadInput("not confirmed (pass --yes)")

    async def go(store: HistoryStore) -> PurgeResult:
        purge_runs = getattr(store, "purge", None)
        if purge_runs is None:
            raise BadInput(f"{type(store).__name__} cannot purge")
        result: PurgeResult = await purge_runs(
            older_than=age,
            run_ids=list(run_ids) if run_ids else None,
            include_unfinished=include_unfinished,
            dry_run=dry_run,
            batch_size=batch_size,
        )
        return result

    try:
        result = _run(_with_store(store_at, go))
    except click.ClickException:
        raise
    except Exception as exc:  # the store's own errors (sqlite3, asyncpg, OSError, ...)
        raise _StoreFailed(f"the history store failed: {type(exc).__name__}: {exc}") from None
    if as_json:
        click.echo(json.dumps(result.to_json_dict()))
        return
    verb = "would purge" if dry_run else "purged"
    line = f"{verb} {result.runs} run(s), {result.events} event(s): {what}"
    if result.kept_unfinished:
        line += (
            f"; kept {result.kept_unfinished} unfinished run(s) "
            "(--include-unfinished purges them too)"
        )
    click.echo(line)


def _confirmed(question: str) -> bool:
    try:
        return click.confirm(question, err=True)
    except click.Abort:  # no answer (stdin closed)
        return False


def _describe(age: timedelta | None, run_ids: tuple[str, ...], include_unfinished: bool) -> str:
    which = "runs" if include_unfinished else "finished runs"
    parts = []
    if run_ids:
        parts.append(f"of {len(run_ids)} given")
    if age is not None:
        parts.append(f"whose last event is older than {age}")
    return " ".join([which, *parts])


@history.command("drain")
@click.option("--store", "where", help=_STORE_HELP)
@click.option(
    "--spool",
    "folder",
    required=True,
    metavar="FOLDER",
    envvar="FLOWCRAFT_HISTORY_SPOOL",
    help="The spool folder of this machine's workers (their --history-spool).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=0.1,
    show_default=True,
    help="Seconds between looks at the folder.",
)
@click.option(
    "--max-value-bytes",
    metavar="BYTES",
    type=click.IntRange(min=0),
    envvar="FLOWCRAFT_HISTORY_MAX_VALUE_BYTES",
    help="A value whose JSON is longer is stored as its size and SHA-256 only "
    "(default 1048576); 0 keeps every value whole.",
)
@click.option("--once", is_flag=True, help="One pass, then exit (else until SIGINT/SIGTERM).")
@click.pass_context
def drain(
    ctx: click.Context,
    where: str | None,
    folder: str,
    interval: float,
    max_value_bytes: int | None,
    once: bool,
) -> None:
    """Store the events that workers append to their spool files in FOLDER
    (`flowcraft worker --history-spool FOLDER` without --history), until SIGINT
    or SIGTERM, then a last pass. The workers then spend no time on the store.
    One drainer per folder; events stay in the files until stored, so a drainer
    stopped or killed loses nothing. (`flowcraft worker --history-drainer` runs
    one itself.)"""
    from flowcraft._cli_fleet import configure_worker_logging, watch_supervisor
    from flowcraft.history import SpoolDrainer

    store_at: str = _inherited(ctx, "where", where)
    cap = DEFAULT_MAX_VALUE_BYTES if max_value_bytes is None else max_value_bytes or None
    configure_worker_logging("INFO", None)  # a long-running process, as a worker
    log = logging.getLogger("flowcraft.history")
    store = _open(store_at, cap)

    async def go() -> int:
        drainer = SpoolDrainer(store, folder, interval=interval)
        try:
            await store.runs(limit=1)  # a store that cannot be used fails here, at once
            if once:
                return await drainer.drain()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            log.info("history drain: %s -> %s", folder, type(store).__name__)
            watch = asyncio.ensure_future(watch_supervisor())
            try:
                await drainer.run(stop)
            finally:
                watch.cancel()
            return drainer.stored
        finally:
            drainer.close()
            await store.aclose()

    try:
        stored = _run(go())
    except click.ClickException:
        raise
    except Exception as exc:  # the store's own errors (sqlite3, asyncpg, OSError, ...)
        raise _StoreFailed(f"the history store failed: {type(exc).__name__}: {exc}") from None
    log.info("history drain stopped: %d events stored", stored)
