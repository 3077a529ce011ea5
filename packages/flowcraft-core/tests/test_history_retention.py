"""History retention on SQLite: purging old or given runs (finished ones unless told
otherwise, in batches), the size cap on stored values and how readers, replay and
the CLI show a value that was not kept."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowcraft import Flow, FlowRuntime, NodeContext, NodeResult
from flowcraft.cli import main
from flowcraft.history import (
    TRUNCATED_KEY,
    History,
    HistoryEvent,
    HistoryRecorder,
    PurgeResult,
    SqliteHistoryStore,
    truncated,
)
from flowcraft.testing import replay_run

DAY = 86400.0
NOW = 1_000 * DAY


def run_events(run_id: str, at: float, status: str | None, nodes: int = 3) -> list[HistoryEvent]:
    """A run's events: its start, each node started and finished, and its end (if
    ``status`` is final), ``awaiting`` (a pause) or nothing more (None: running)."""
    events = [
        HistoryEvent(run_id, "workflow:start", "workflow:start", data={"blueprintId": "b"}, at=at)
    ]
    for i in range(nodes):
        for kind in ("node:start", "node:finish"):
            events.append(
                HistoryEvent(run_id, kind, f"{kind}\x1fn{i}\x1f1\x1f", f"n{i}", 1, 1, {}, at + i)
            )
    if status == "awaiting":
        events.append(HistoryEvent(run_id, "workflow:pause", "workflow:pause", at=at + nodes))
    elif status is not None:
        key = f"workflow:finish\x1f{status}"
        data = {"status": status}
        events.append(HistoryEvent(run_id, "workflow:finish", key, data=data, at=at + nodes))
    return events


FLEET = {  # run: (age in days, status)
    "old-done": (40, "completed"),
    "old-failed": (35, "failed"),
    "old-cancelled": (31, "cancelled"),
    "old-running": (40, None),
    "old-awaiting": (40, "awaiting"),
    "new-done": (2, "completed"),
    "new-running": (1, None),
}
EVENTS_PER_RUN = 8  # start, 3 nodes x 2, the end (or the pause); a running run: 7


async def fill(store: Any, now: float = NOW) -> None:
    for run_id, (age, status) in FLEET.items():
        await store.write(run_events(run_id, now - age * DAY, status))


async def kept(store: Any) -> set[str]:
    return {r.run_id for r in await store.runs(limit=10_000)}


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    async with SqliteHistoryStore(tmp_path / "history.db") as made:
        yield made


async def test_purge_by_age_deletes_finished_runs_only(store: Any) -> None:
    await fill(store)
    month = timedelta(days=30)
    counted = await store.purge(older_than=month, dry_run=True, now=NOW)
    assert counted == PurgeResult(3, 3 * EVENTS_PER_RUN, kept_unfinished=2, dry_run=True)
    assert len(await kept(store)) == len(FLEET)  # a dry run deletes nothing
    # batch_size 2: each run's events take several transactions, the runs two batches
    done = await store.purge(older_than=month, batch_size=2, now=NOW)
    assert done == PurgeResult(3, 3 * EVENTS_PER_RUN, kept_unfinished=2)
    assert await kept(store) == {"old-running", "old-awaiting", "new-done", "new-running"}
    for gone in ("old-done", "old-failed", "old-cancelled"):
        assert await store.events(gone) == []
    assert len(await store.events("old-running")) == EVENTS_PER_RUN - 1
    assert await store.purge(older_than=month, now=NOW) == PurgeResult(0, 0, kept_unfinished=2)
    # asked explicitly: the unfinished too (a running run's events included)
    forced = await store.purge(older_than=month, include_unfinished=True, now=NOW)
    assert forced == PurgeResult(2, 2 * EVENTS_PER_RUN - 1, kept_unfinished=0)
    assert await kept(store) == {"new-done", "new-running"}
    # the age is the last event's: a run started long ago but still writing is young
    await store.write(run_events("long", NOW - 90 * DAY, None))
    await store.write(
        [HistoryEvent("long", "workflow:finish", "f", data={"status": "completed"}, at=NOW)]
    )
    assert (await store.purge(older_than=month, now=NOW)).runs == 0
    assert (await store.purge(older_than=timedelta(0), now=NOW + 1)).runs == 2


async def test_purge_of_given_runs(store: Any) -> None:
    await fill(store)
    given = ["old-done", "new-done", "old-running", "no-such-run", "'); DROP TABLE x; --"]
    assert await store.purge(run_ids=given) == PurgeResult(2, 2 * EVENTS_PER_RUN, 1)
    assert "old-running" in await kept(store)
    # with an age: only those of the given runs that old (seconds work as well)
    await fill(store)
    both = await store.purge(run_ids=["old-done", "new-done"], older_than=30 * DAY, now=NOW)
    assert both.runs == 1
    assert {"new-done", "old-failed"} <= await kept(store)
    assert await store.purge(run_ids=[]) == PurgeResult(0, 0, 0)
    with pytest.raises(ValueError, match="older_than, run_ids"):
        await store.purge()
    with pytest.raises(TypeError):
        await store.purge(run_ids="old-done")
    with pytest.raises(ValueError, match="0 or more"):
        await store.purge(older_than=-1.0)


async def test_writers_go_on_while_a_purge_runs(store: Any, tmp_path: Path) -> None:
    """Another process's connection writes between the purge's transactions."""
    runs = [f"r{i}" for i in range(60)]
    for run_id in runs:
        await store.write(run_events(run_id, NOW - 40 * DAY, "completed", nodes=10))
    other = SqliteHistoryStore(tmp_path / "history.db")
    try:
        purge = asyncio.ensure_future(store.purge(older_than=DAY, batch_size=7, now=NOW))
        written = 0
        while not purge.done():  # a batch every few ms, as a busy recorder writes
            written += await other.write(run_events(f"w{written}", NOW, "completed", nodes=0))
            await asyncio.sleep(0.002)
        result = await purge
    finally:
        await other.aclose()
    assert result.runs == len(runs)
    assert result.events == len(runs) * 22
    assert written > 0
    assert len(await kept(store)) == written // 2


def big_flow() -> Flow:
    async def load(ctx: NodeContext) -> str:
        await ctx.set("blob", "b" * 3000)
        await ctx.set("note", "small")
        return "x" * 5000

    async def size(ctx: NodeContext) -> int:
        return len(ctx.input)

    async def read_blob(ctx: NodeContext) -> int:
        return len(await ctx.get("blob"))

    return (
        Flow("big")
        .node("load", load)
        .node("size", size)
        .node("blob_size", read_blob)
        .chain("load", "size", "blob_size")
    )


async def test_a_tiny_cap_keeps_what_names_the_run_and_its_steps(tmp_path: Path) -> None:
    """Values are capped; a run's blueprint, status, activations and actions are not
    (a 4-byte cap once recorded the status "completed" as a marker)."""
    flow = (
        Flow("tiny-cap")
        .node("load", lambda c: NodeResult("a long output", action="onwards"))
        .node("end", lambda c: 1)
        .edge("load", "end", action="onwards")
    )
    async with SqliteHistoryStore(tmp_path / "h.db", max_value_bytes=4) as store:
        async with HistoryRecorder(store) as recorder:
            await FlowRuntime(event_bus=recorder).run(flow, {"user": "ada"}, run_id="t1")
        (run,) = await store.runs()
        assert (run.run_id, run.blueprint_id, run.status) == ("t1", "tiny-cap", "completed")
        steps = await History(store).steps("t1")
        assert [(s.node_id, s.activation, s.status, s.action) for s in steps] == [
            ("load", 1, "finished", "onwards"),
            ("end", 1, "finished", None),
        ]
        assert steps[0].truncated == ["output"]
        assert steps[1].output == 1


async def test_a_value_over_the_cap_is_kept_as_a_marker(tmp_path: Path) -> None:
    async with SqliteHistoryStore(tmp_path / "h.db", max_value_bytes=1000) as store:
        async with HistoryRecorder(store) as recorder:
            initial = {"huge": list(range(500)), "user": "ada"}
            result = await FlowRuntime(event_bus=recorder).run(big_flow(), initial, run_id="b1")
        history = History(store)
        steps = await history.steps("b1")
        assert [s.truncated for s in steps] == [["output", "context['blob']"], ["input"], []]
        marker = truncated(steps[0].output)
        assert marker is not None
        assert marker.bytes == 5002
        assert marker.matches("x" * 5000)
        assert not marker.matches("y" * 5000)
        assert steps[2].output == 3000
        start = await history.context_at("b1", 0)
        assert start["user"] == "ada"  # each key of the initial context capped alone
        assert set(start.truncated) == {"huge"}
        assert start.truncated["huge"].matches(list(range(500)))
        end = await history.context_at("b1")
        assert set(end.truncated) == {"huge", "blob", "_outputs.load"}
        assert end["note"] == "small"
        assert end["_outputs.size"] == 5000
        assert end["blob"] == {TRUNCATED_KEY: end.truncated["blob"].to_json_dict()}
        assert {k: v for k, v in end.items() if k not in end.truncated} == {
            k: v for k, v in result.context.items() if k not in end.truncated
        }
        timeline = await history.timeline("b1")
        assert "output=<not kept: 5002 bytes, sha256 " in timeline
        assert 'context={"huge":"<not kept: ' in timeline
        # nothing over the cap in the file
        with sqlite3.connect(tmp_path / "h.db") as conn:
            longest = conn.execute("SELECT max(length(data)) FROM flowcraft_history_events")
            assert longest.fetchone()[0] < 1200

        # replay never runs a node on a value that was not kept
        report = await replay_run(store, "b1", big_flow())
        assert report.replayed == [1]  # its output and write compared by their hashes
        assert report.changes == []
        assert report.skipped == [
            (2, "size", f"its input was not kept in the history ({marker})"),
            (3, "blob_size", "read context 'blob', not kept in the history"),
        ]
        changed = (
            Flow("big")
            .node("load", lambda ctx: "y" * 5000)
            .node("size", lambda ctx: 0)
            .node("blob_size", lambda ctx: 0)
            .chain("load", "size", "blob_size")
        )
        report = await replay_run(store, "b1", changed)
        assert [(c.step, c.what, c.key) for c in report.changes] == [
            (1, "output", None),
            (1, "context", "blob"),  # no longer written
            (1, "context", "note"),
            (3, "output", None),  # it no longer reads the blob: replayed
        ]
        assert report.changes[0].recorded == steps[0].output


async def test_the_default_cap_and_no_cap(tmp_path: Path) -> None:
    event = HistoryEvent("r", "node:finish", "k", "n", 1, None, {"output": "z" * (2 << 20)}, 1.0)
    async with SqliteHistoryStore(tmp_path / "a.db") as capped:  # 1 MiB by default
        await capped.write([event])
        (stored,) = await capped.events("r")
        assert truncated(stored.data["output"]) is not None
    async with SqliteHistoryStore(tmp_path / "b.db", max_value_bytes=None) as whole:
        await whole.write([event])
        (stored,) = await whole.events("r")
        assert stored.data["output"] == "z" * (2 << 20)
    with pytest.raises(ValueError, match="at least 1"):
        SqliteHistoryStore(tmp_path / "c.db", max_value_bytes=0)


def test_cli_purge(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"

    async def record() -> None:
        async with SqliteHistoryStore(path) as store:
            await fill(store, time.time())  # the CLI's clock is the real one

    asyncio.run(record())
    runner = CliRunner()
    store = ["--store", str(path)]
    nothing = runner.invoke(main, ["history", "purge", *store])
    assert nothing.exit_code == 2
    assert "--older-than" in nothing.stderr
    bad = runner.invoke(main, ["history", "purge", *store, "--older-than", "a month"])
    assert bad.exit_code == 2
    assert "e.g. 30d" in bad.stderr
    dry = runner.invoke(main, ["history", "purge", *store, "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would purge 3 run(s), 24 event(s): finished runs whose")
    assert "kept 2 unfinished run(s)" in dry.stdout
    refused = runner.invoke(main, ["history", "purge", *store, "--older-than", "30d"])
    assert refused.exit_code == 2
    assert "not confirmed" in refused.stderr
    one = runner.invoke(
        main, ["history", *store, "purge", "--run", "old-done", "--run", "old-running", "--yes"]
    )  # --store given before the subcommand works too
    assert one.exit_code == 0, one.output
    assert one.stdout.startswith("purged 1 run(s), 8 event(s): finished runs of 2 given")
    asked = runner.invoke(
        main, ["history", "purge", *store, "--older-than", "4w", "--json"], input="y\n"
    )
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout) == {
        "runs": 2,
        "events": 16,
        "keptUnfinished": 2,
        "dryRun": False,
    }
    every = runner.invoke(
        main,
        ["history", "purge", *store, "--older-than", "3d", "--include-unfinished", "--yes"],
    )
    assert every.exit_code == 0
    assert every.stdout.startswith("purged 2 run(s), 15 event(s)")
    listed = runner.invoke(main, ["history", *store, "--json"])
    assert {r["runId"] for r in json.loads(listed.stdout)["runs"]} == {"new-done", "new-running"}
    broken = tmp_path / "broken.db"
    broken.write_text("not a database")
    failed = runner.invoke(
        main, ["history", "purge", "--store", str(broken), "--run", "x", "--yes"]
    )
    assert failed.exit_code == 1
    assert "the history store failed" in failed.stderr


def test_cli_shows_what_was_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "big.db"

    async def record() -> None:
        async with (
            SqliteHistoryStore(path, max_value_bytes=1000) as store,
            HistoryRecorder(store) as recorder,
        ):
            await FlowRuntime(event_bus=recorder).run(big_flow(), run_id="b2")

    asyncio.run(record())
    runner = CliRunner()
    at = runner.invoke(main, ["history", "b2", "--store", str(path), "--at", "1"])
    assert at.exit_code == 0, at.output
    assert json.loads(at.stdout)["note"] == "small"
    assert "not kept in the history: 'blob' <not kept: 3002 bytes" in at.stderr
    as_json = runner.invoke(main, ["history", "--store", str(path), "show", "b2", "--at", "1"])
    assert as_json.exit_code == 0  # `show RUN` is the long form of `history RUN`
    body = runner.invoke(main, ["history", "b2", "--store", str(path), "--at", "1", "--json"])
    assert set(json.loads(body.stdout)["truncated"]) == {"blob", "_outputs.load"}
    steps = runner.invoke(main, ["history", "--json", "--store", str(path), "b2"])
    assert [s["truncated"] for s in json.loads(steps.stdout)["steps"]][1] == ["input"]
