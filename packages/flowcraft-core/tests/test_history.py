"""Run history (flowcraft.history): recorded through the event bus in memory and on the
in-memory fleet, duplicate-free, rebuilt step by step (time travel), printed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from flowcraft import Flow, FlowEvent, FlowRuntime, NodeContext, RuntimeOptions
from flowcraft.cli import main
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.history import (
    History,
    HistoryError,
    HistoryEvent,
    HistoryRecorder,
    HistoryStore,
    SqliteHistoryStore,
    event_key,
    open_store,
    recent_runs,
)
from flowcraft.history._reader import summary_of
from flowcraft.testing.replay import replay_run


async def _load(ctx: NodeContext) -> dict[str, Any]:
    await ctx.set("customer", "ada")
    return {"items": [3, 4]}


async def _total(ctx: NodeContext) -> int:
    total = sum(ctx.input["items"])
    await ctx.set("total", total)
    return total


def invoice() -> Flow:
    return (
        Flow("invoice")
        .node("load", _load)
        .node("total", _total)
        .node("big", lambda ctx: "review")
        .node("small", lambda ctx: "approve")
        .chain("load", "total")
        .edge("total", "big", condition="result.output >= 100")
        .edge("total", "small", condition="result.output < 100")
    )


async def _count(ctx: NodeContext) -> int:
    n = int(await ctx.get("n") or 0) + 1
    await ctx.set("n", n)
    return n


def counter() -> Flow:
    """A loop of one node: three iterations, each writing ``n``."""
    return (
        Flow("counter")
        .node("begin", lambda ctx: 0)
        .node("inc", _count)
        .node("done", lambda ctx: ctx.input)
        .edge("begin", "inc")
        .loop("inc", "inc", while_="n < 3")
        .edge("inc", "done", condition="n >= 3")
    )


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    async with SqliteHistoryStore(tmp_path / "history.db") as made:
        yield made


async def test_an_in_memory_run_is_recorded_and_rebuilt_at_every_step(store: Any) -> None:
    async with HistoryRecorder(store) as recorder:
        result = await FlowRuntime(event_bus=recorder).run(
            invoice(), {"currency": "EUR"}, run_id="inv-1"
        )
    assert result.status == "completed"
    history = History(store)
    steps = await history.steps("inv-1")
    assert [(s.node_id, s.status) for s in steps] == [
        ("load", "finished"),
        ("total", "finished"),
        ("big", "skipped"),
        ("small", "finished"),
    ]
    assert steps[1].input == {"items": [3, 4]}
    assert steps[1].changes == [{"op": "set", "key": "total", "value": 7}]
    assert await history.context_at("inv-1", 0) == {"currency": "EUR"}
    assert await history.context_at("inv-1", 1) == {
        "currency": "EUR",
        "customer": "ada",
        "_outputs.load": {"items": [3, 4]},
    }
    assert await history.context_at("inv-1", 2) == {
        "currency": "EUR",
        "customer": "ada",
        "total": 7,
        "_outputs.load": {"items": [3, 4]},
        "_outputs.total": 7,
    }
    assert await history.context_at("inv-1") == result.context  # the last step: the end
    with pytest.raises(ValueError, match="steps 0 to 4"):
        await history.context_at("inv-1", 5)
    with pytest.raises(LookupError):
        await history.context_at("no-such-run")
    (run,) = await history.recent_runs()
    assert (run.run_id, run.blueprint_id, run.status) == ("inv-1", "invoice", "completed")


async def test_loop_iterations_are_separate_steps(store: Any) -> None:
    async with HistoryRecorder(store) as recorder:
        result = await FlowRuntime(event_bus=recorder).run(counter(), run_id="loop-1")
    assert result.status == "completed"
    history = History(store)
    steps = await history.steps("loop-1")
    assert [(s.node_id, s.activation) for s in steps] == [
        ("begin", 1),
        ("inc", 1),
        ("inc", 2),
        ("inc", 3),
        ("done", 1),
    ]
    assert [(await history.context_at("loop-1", i)).get("n") for i in range(5)] == [
        None,
        None,
        1,
        2,
        3,
    ]


async def test_the_same_events_twice_are_stored_once(store: Any) -> None:
    bus_events: list[FlowEvent] = []
    from flowcraft import CollectingEventBus

    collecting = CollectingEventBus()
    async with HistoryRecorder(store, inner=collecting) as recorder:
        await FlowRuntime(event_bus=recorder).run(invoice(), run_id="twice")
    bus_events = collecting.events
    first = await store.events("twice")
    assert len(first) == len(bus_events)  # every event went through, and on to ``inner``
    async with HistoryRecorder(store) as again:
        for event in bus_events:  # what a redelivered job would emit again
            again.emit(event)
    assert await store.events("twice") == first
    assert again.written == len(bus_events)


def test_event_identity() -> None:
    finish = FlowEvent("node:finish", "r", "a", {"activation": 2, "output": 1})
    assert event_key(finish) == event_key(
        FlowEvent("node:finish", "r", "a", {"activation": 2, "output": 1, "redelivered": True})
    )
    assert event_key(finish) != event_key(FlowEvent("node:finish", "r", "a", {"activation": 3}))
    start1 = FlowEvent("node:start", "r", "a", {"activation": 1, "attempt": 1})
    start2 = FlowEvent("node:start", "r", "a", {"activation": 1, "attempt": 2})
    assert event_key(start1) != event_key(start2)
    change = FlowEvent("context:change", "r", "a", {"activation": 1, "key": "x", "value": 1})
    other = FlowEvent("context:change", "r", "a", {"activation": 1, "key": "y", "value": 1})
    assert event_key(change) != event_key(other)
    # Events of a kind this version does not know, without an activation: each kept.
    signal = FlowEvent("signal:received", "r", None, {"event": "paid"})
    assert event_key(signal) != event_key(signal)
    # ... unless the emitter names the event.
    named = FlowEvent("signal:received", "r", None, {"eventId": "paid-1"})
    assert event_key(named) == event_key(
        FlowEvent("signal:received", "r", None, {"eventId": "paid-1"})
    )


async def test_a_fleet_with_duplicate_deliveries_records_each_event_once(store: Any) -> None:
    """The in-memory fleet enqueues half its jobs twice: the duplicates emit their
    resolutions again (job:duplicate and a redelivered node:finish), and history keeps
    one of each per activation, with the same steps as the run in one process."""
    broker = InMemoryBroker(duplicate_rate=0.5, seed=3)
    recorder = HistoryRecorder(store)
    options = dataclasses.replace(
        RuntimeOptions.from_flows(invoice(), counter()), event_bus=recorder
    )
    worker = InMemoryAdapter(runtime_options=options, broker=broker)
    recorder.instrument(worker)
    runs = [await worker.start_run("invoice", {"currency": "EUR"}) for _ in range(3)]
    runs.append(await worker.start_run("counter"))
    await worker.run_until_idle()
    await recorder.aclose()
    history = History(store)
    duplicates = 0
    for run_id in runs:
        events = await history.events(run_id)
        duplicates += sum(e.kind == "job:duplicate" for e in events)
        resolutions = Counter(
            (e.node_id, e.activation)
            for e in events
            if e.kind in ("node:finish", "node:skipped", "node:error")
        )
        assert set(resolutions.values()) == {1}, resolutions
        assert [e.kind for e in events].count("workflow:finish") == 1
    assert duplicates > 0  # the duplicates did happen
    steps = await history.steps(runs[0])
    assert [(s.node_id, s.status) for s in steps] == [
        ("load", "finished"),
        ("total", "finished"),
        ("big", "skipped"),
        ("small", "finished"),
    ]
    final = await worker.get_final_result(runs[0])
    assert final is not None
    assert await history.context_at(runs[0]) == final.context
    loop_final = await worker.get_final_result(runs[3])
    assert loop_final is not None
    assert await history.context_at(runs[3]) == loop_final.context
    at = [(await history.context_at(runs[3], i)).get("n") for i in range(5)]
    assert at == [None, None, 1, 2, 3]
    summaries = {r.run_id: r for r in await recent_runs(store)}
    assert {summaries[r].status for r in runs} == {"completed"}


async def test_a_resumed_wait_is_a_step(store: Any) -> None:
    flow = (
        Flow("approve")
        .node("ask", lambda ctx: "asked")
        .wait("approval")
        .node("after", lambda ctx: f"approved by {ctx.input}")
        .chain("ask", "approval", "after")
    )
    async with HistoryRecorder(store) as recorder:
        runtime = FlowRuntime(event_bus=recorder)
        paused = await runtime.run(flow, run_id="w1")
        assert paused.status == "awaiting"
        done = await runtime.resume(flow, paused, output="ada")
    assert done.status == "completed"
    history = History(store)
    steps = await history.steps("w1")
    assert [(s.node_id, s.status, s.output) for s in steps] == [
        ("ask", "finished", "asked"),
        ("approval", "resumed", "ada"),
        ("after", "finished", "approved by ada"),
    ]
    assert (await history.recent_runs())[0].status == "completed"
    assert await history.context_at("w1") == done.context


async def test_a_store_that_fails_never_blocks_and_drops_beyond_the_bound() -> None:
    class Down:
        writes = 0

        async def write(self, events: list[HistoryEvent]) -> int:
            self.writes += 1
            raise ConnectionError("history store down")

        async def events(self, run_id: str) -> list[HistoryEvent]:
            return []

        async def runs(self, *, limit: int = 20, status: str | None = None) -> list[Any]:
            return []

        async def aclose(self) -> None:
            return None

    down = Down()
    recorder = HistoryRecorder(down, batch_size=10, max_pending=50, flush_interval=0.01)
    for i in range(80):
        assert recorder.emit(FlowEvent("node:finish", "r", "a", {"activation": i})) is None
    assert recorder.dropped == 30
    await asyncio.sleep(0.05)
    assert down.writes >= 1
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await recorder.flush()
    assert recorder._task is not None
    recorder._task.cancel()


async def test_batches_by_size_and_time(tmp_path: Path) -> None:
    class Counting(SqliteHistoryStore):
        batches: list[int] = []

        async def write(self, events: list[HistoryEvent]) -> int:
            self.batches.append(len(events))
            return await super().write(events)

    async with Counting(tmp_path / "h.db") as counting:
        recorder = HistoryRecorder(counting, batch_size=100, flush_interval=0.05)
        for i in range(250):
            recorder.emit(FlowEvent("node:finish", "r", f"n{i}", {"activation": 1}))
        await asyncio.sleep(0)  # the writer takes full batches at once
        await asyncio.sleep(0.2)  # the rest after flush_interval
        assert counting.batches == [100, 100, 50]
        recorder.emit(FlowEvent("node:finish", "r", "late", {"activation": 1}))
        await recorder.aclose()  # closing writes what is queued
        assert counting.batches[-1] == 1
        assert len(await counting.events("r")) == 251


async def test_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    async with SqliteHistoryStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE flowcraft_history_meta SET value = '99' WHERE name = 'schema_version'")
    conn.close()
    store = SqliteHistoryStore(path)
    with pytest.raises(HistoryError, match="version 99"):
        await store.write([HistoryEvent("r", "x", "k", at=1.0)])
    await store.aclose()
    with pytest.raises(HistoryError, match="letters, digits"):
        SqliteHistoryStore(path, table_prefix="x; DROP TABLE y")


async def test_hostile_ids_and_values_are_data(store: Any) -> None:
    run_id = "r'); DROP TABLE flowcraft_history_events; --\u2603"
    recorder = HistoryRecorder(store)
    recorder.emit(FlowEvent("workflow:start", run_id, None, {"blueprintId": "b'", "context": {}}))
    recorder.emit(
        FlowEvent(
            "context:change",
            run_id,
            "n'\"",
            {"activation": 1, "key": "k\x00\ud800", "value": {1, 2}, "op": "set"},
        )
    )
    recorder.emit(FlowEvent("node:finish", run_id, "n'\"", {"activation": 1, "output": object()}))
    await recorder.aclose()
    events = await store.events(run_id)
    assert [e.kind for e in events] == ["workflow:start", "context:change", "node:finish"]
    assert events[1].data["value"] == [1, 2]
    assert events[2].data["output"].startswith("<object object")


def test_open_store_reads_paths_and_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "a.db"), SqliteHistoryStore)
    assert open_store(f"sqlite:///{tmp_path}/b.db").path == f"{tmp_path}/b.db"  # type: ignore[attr-defined]


def test_cli_prints_a_runs_timeline_and_lists_runs(tmp_path: Path) -> None:
    path = tmp_path / "cli.db"

    async def record() -> None:
        async with SqliteHistoryStore(path) as store, HistoryRecorder(store) as recorder:
            await FlowRuntime(event_bus=recorder).run(invoice(), run_id="cli-1")

    asyncio.run(record())
    runner = CliRunner()
    shown = runner.invoke(main, ["history", "cli-1", "--store", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "run cli-1  blueprint invoice  completed" in shown.stdout
    assert "context:change   total" in shown.stdout
    as_json = runner.invoke(main, ["history", "cli-1", "--store", str(path), "--json"])
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.stdout)
    assert body["run"]["status"] == "completed"
    assert [s["nodeId"] for s in body["steps"]] == ["load", "total", "big", "small"]
    assert body["events"][0]["kind"] == "workflow:start"
    at = runner.invoke(main, ["history", "cli-1", "--store", str(path), "--at", "1", "--json"])
    assert json.loads(at.stdout)["context"]["customer"] == "ada"
    listed = runner.invoke(main, ["history", "--store", str(path), "--json"])
    assert [r["runId"] for r in json.loads(listed.stdout)["runs"]] == ["cli-1"]
    nowhere = runner.invoke(main, ["history", "--store", str(tmp_path / "none.db")])
    assert nowhere.exit_code != 0
    assert "no history at" in nowhere.output
    assert not (tmp_path / "none.db").exists()
    missing = runner.invoke(main, ["history", "nope", "--store", str(path)])
    assert missing.exit_code != 0
    assert "no history for run 'nope'" in missing.output


async def _total_with_tax(ctx: NodeContext) -> int:
    total = round(sum(ctx.input["items"]) * 1.2)
    await ctx.set("total", total)
    await ctx.set("tax", "20%")
    return total


async def test_replay_reports_what_new_node_code_changes(store: Any) -> None:
    async with HistoryRecorder(store) as recorder:
        await FlowRuntime(event_bus=recorder).run(invoice(), run_id="r1")
    same = await replay_run(store, "r1", invoice())
    assert not same.changed, same.summary()
    assert same.replayed == [1, 2, 4]  # "big" was skipped in the recorded run
    assert same.skipped == [(3, "big", "skipped in the recorded run")]

    changed_flow = (
        Flow("invoice")
        .node("load", _load)
        .node("total", _total_with_tax)
        .node("small", lambda ctx: "approve")
        .chain("load", "total")
        .edge("total", "small", condition="result.output < 100")
    )
    report = await replay_run(store, "r1", changed_flow)
    assert report.changed
    found = {
        node: [(c.what, c.key, c.recorded, c.replayed) for c in changes]
        for node, changes in report.by_node().items()
    }
    assert found == {
        "total": [
            ("output", None, 7, 8),
            ("context", "tax", None, "20%"),
            ("context", "total", 7, 8),
        ],
        "big": [("missing", None, True, None)],
    }
    assert "step 2 total: output 7 -> 8" in report.summary()


async def test_replay_sees_a_node_that_now_fails(store: Any) -> None:
    async with HistoryRecorder(store) as recorder:
        await FlowRuntime(event_bus=recorder).run(counter(), run_id="c1")

    async def broken(ctx: NodeContext) -> int:
        n = int(await ctx.get("n") or 0) + 1
        if n == 2:
            raise RuntimeError("no second iteration")
        await ctx.set("n", n)
        return n

    flow = (
        Flow("counter")
        .node("begin", lambda ctx: 0)
        .node("inc", broken)
        .node("done", lambda ctx: ctx.input)
        .edge("begin", "inc")
        .loop("inc", "inc", while_="n < 3")
        .edge("inc", "done", condition="n >= 3")
    )
    report = await replay_run(store, "c1", flow, nodes={"inc"})
    assert report.replayed == [2, 3, 4]
    ((change),) = report.changes
    assert (change.node_id, change.activation, change.what, change.recorded) == (
        "inc",
        2,
        "error",
        None,
    )
    assert "no second iteration" in change.replayed


_DIES_WITH_EVENTS_QUEUED = """
import asyncio, os, signal, sys
from flowcraft import FlowEvent
from flowcraft.history import HistoryRecorder, SqliteHistoryStore

async def main():
    recorder = HistoryRecorder(SqliteHistoryStore(sys.argv[1]), spool=sys.argv[2],
                               flush_interval=3600, batch_size=1000)
    for i in range(100):
        recorder.emit(FlowEvent("node:finish", "spooled", f"n{i}", {"activation": 1, "output": i}))
    os.kill(os.getpid(), signal.SIGKILL)  # with all 100 still queued

asyncio.run(main())
"""


async def test_a_killed_processs_queued_events_are_recovered_from_its_spool(
    tmp_path: Path,
) -> None:
    db, spool = tmp_path / "h.db", tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIES_WITH_EVENTS_QUEUED, str(db), str(spool)
    )
    assert await proc.wait() == -signal.SIGKILL
    async with SqliteHistoryStore(db) as store:
        assert await store.events("spooled") == []  # lost from its memory ...
        assert len(list(spool.glob("*.spool"))) == 1
        recorder = HistoryRecorder(store, spool=spool)
        assert await recorder.recover() == 100  # ... kept in its spool
        assert sorted(e.data["output"] for e in await store.events("spooled")) == list(range(100))
        assert list(spool.glob("*.spool")) == []
        recorder.emit(FlowEvent("node:finish", "spooled", "n0", {"activation": 1, "output": 0}))
        assert len(list(spool.glob("*.spool"))) == 1  # its own, alive: not an orphan
        assert await recorder.recover() == 0
        await recorder.aclose()
        assert list(spool.glob("*.spool")) == []  # everything stored: its own file goes
        assert len(await store.events("spooled")) == 100


def test_a_spool_line_reads_back_as_its_event(tmp_path: Path) -> None:
    """The spool builds its lines by hand (the job path's cost): whatever an event
    holds, the line reads back as the same event, its data's text the store's."""
    from flowcraft.history._records import dumps_data, loads_data, record_of
    from flowcraft.history._spool import Spool
    from flowcraft.history._spool import read as read_spool

    circular: dict[str, Any] = {}
    circular["self"] = circular
    events = [
        FlowEvent("workflow:start", "r\"\\'\u2603\ud800\x00", None, {"context": {"a": 1}}),
        FlowEvent(
            "context:change",
            "r1",
            "n\x1f\u00e9",
            {"activation": 2, "key": "k\ud800", "value": float("nan"), "op": "set"},
        ),
        FlowEvent("node:start", "r1", "n", {"activation": 1, "attempt": 3, "input": {1, 2}}),
        FlowEvent("node:finish", "r1", "n", {"activation": 1, "output": circular}),
    ]
    spool = Spool(tmp_path)
    records = [record_of(e, "host\u2603:1") for e in events]
    for r in records:
        spool.append(r)
    spool.close(remove=False)
    back = read_spool(spool.path)
    assert len(back) == len(records)
    for r, b in zip(records, back, strict=True):
        assert (b.run_id, b.kind, b.key, b.node_id) == (r.run_id, r.kind, r.key, r.node_id)
        assert (b.activation, b.attempt, b.at, b.worker) == (
            r.activation,
            r.attempt,
            r.at,
            r.worker,
        )
        assert r.text == dumps_data(r.data)
        assert loads_data(r.text) == b.data or r.kind == "context:change"  # NaN != NaN
    assert back[2].data["input"] == [1, 2]
    assert isinstance(back[3].data, dict)


def _status_event(run_id: str, kind: str, at: float, **data: object) -> HistoryEvent:
    return HistoryEvent(run_id, kind, f"{kind}@{at}", "n", 1, 1, dict(data), at)


# (kind, emitter's clock, status data) in the order they reach the store, one batch
# each, and the run's status after each.
_STATUS_STEPS = [
    ("workflow:start", 1.0, {}, "running"),
    ("node:awaiting", 2.0, {}, "awaiting"),  # a fleet's run says it waits through a node
    ("workflow:resume", 3.0, {}, "running"),
    ("node:sleep", 4.0, {}, "awaiting"),
    ("node:wake", 5.0, {}, "running"),
    ("workflow:finish", 6.0, {"status": "completed"}, "completed"),
    ("node:wake", 9.0, {}, "completed"),  # a duplicate job after the end: the end stays
    ("node:awaiting", 10.0, {}, "completed"),
]


async def check_status_steps(store: HistoryStore, run_id: str) -> None:
    seen = []
    for kind, at, data, _ in _STATUS_STEPS:
        await store.write([_status_event(run_id, kind, at, **data)])
        (summary,) = [r for r in await store.runs(limit=100) if r.run_id == run_id]
        seen.append(summary.status)
    assert seen == [step[3] for step in _STATUS_STEPS]
    assert summary_of(run_id, await store.events(run_id)).status == "completed"
    # A final status reaching the store with an older clock than the last wait still
    # ends the run (processes' clocks differ), in one batch and across batches.
    late = f"{run_id}-late"
    await store.write([_status_event(late, "node:awaiting", 50.0)])
    await store.write([_status_event(late, "workflow:finish", 40.0, status="cancelled")])
    together = f"{run_id}-together"
    await store.write(
        [
            _status_event(together, "workflow:finish", 40.0, status="failed"),
            _status_event(together, "node:awaiting", 50.0),
        ]
    )
    statuses = {r.run_id: r.status for r in await store.runs(limit=100)}
    assert (statuses[late], statuses[together]) == ("cancelled", "failed")
    assert summary_of(late, await store.events(late)).status == "cancelled"


async def test_a_run_s_status_follows_its_waits_and_its_end_stays(tmp_path: Path) -> None:
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        await check_status_steps(store, "s1")
