"""A machine's one history writer: workers that only spool, and a SpoolDrainer that
stores what they spool, loses nothing when either side dies and stores each event once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowcraft import Flow, FlowEvent, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter
from flowcraft.history import (
    HistoryEvent,
    HistoryRecorder,
    SpoolDrainer,
    SqliteHistoryStore,
    event_key,
)
from flowcraft.history import _recorder as recorder_module
from flowcraft.history._records import record_of
from flowcraft.history._spool import Spool


def spool_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.spool"))


def finish(i: int, run_id: str = "r") -> FlowEvent:
    return FlowEvent("node:finish", run_id, f"n{i}", {"activation": 1, "output": i})


async def outputs(store: SqliteHistoryStore, run_id: str = "r") -> list[Any]:
    return [e.data["output"] for e in await store.events(run_id)]


class FlakyStore:
    """A SQLite store that refuses every call while ``down`` (and counts writes)."""

    def __init__(self, inner: SqliteHistoryStore) -> None:
        self.inner = inner
        self.down = False
        self.writes = 0

    async def write(self, events: list[HistoryEvent]) -> int:
        self.writes += 1
        if self.down:
            raise ConnectionError("history store unreachable")
        return await self.inner.write(events)

    async def events(self, run_id: str) -> list[HistoryEvent]:
        return await self.inner.events(run_id)

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[Any]:
        if self.down:
            raise ConnectionError("history store unreachable")
        return await self.inner.runs(limit=limit, status=status)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_recorder_without_a_store_needs_a_spool() -> None:
    with pytest.raises(ValueError, match="spool"):
        HistoryRecorder(None)


async def test_a_spool_only_recorder_cannot_hold_acknowledgements(tmp_path: Path) -> None:
    recorder = HistoryRecorder(None, spool=tmp_path)
    with pytest.raises(ValueError, match="stored"):
        recorder.instrument(InMemoryAdapter(runtime_options=RuntimeOptions()))


async def test_the_drainer_stores_what_a_live_recorder_spools_and_deletes_it_once_closed(
    tmp_path: Path,
) -> None:
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        recorder = HistoryRecorder(None, spool=tmp_path / "spool")
        drainer = SpoolDrainer(store, tmp_path / "spool")
        for i in range(3):
            recorder.emit(finish(i))
        await recorder.flush()  # nothing to wait for: the events are in the file
        assert await store.events("r") == []  # the worker never writes the store
        assert await drainer.drain() == 3
        assert await outputs(store) == [0, 1, 2]
        for i in range(3, 5):
            recorder.emit(finish(i))
        assert await drainer.drain() == 2  # only what the file gained
        assert await drainer.drain() == 0
        assert len(spool_files(tmp_path / "spool")) == 1  # still the recorder's
        recorder.emit(finish(5))
        await recorder.aclose()
        assert await drainer.drain() == 1
        assert spool_files(tmp_path / "spool") == []
        assert await outputs(store) == [0, 1, 2, 3, 4, 5]
        drainer.close()


async def test_full_spool_files_are_let_go_of_and_each_event_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 400)
    folder = tmp_path / "spool"
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        recorder = HistoryRecorder(None, spool=folder)
        drainer = SpoolDrainer(store, folder, batch_size=3)
        for i in range(20):
            recorder.emit(finish(i))
            if i % 7 == 0:
                await drainer.drain()
        assert len(spool_files(folder)) > 1
        await drainer.drain()
        assert len(spool_files(folder)) == 1  # the full ones went once read
        assert await outputs(store) == list(range(20))
        assert drainer.stored == 20  # nothing read twice
        await recorder.aclose()
        await drainer.drain()
        assert spool_files(folder) == []
        drainer.close()


async def test_a_line_still_being_copied_waits_for_its_end(tmp_path: Path) -> None:
    """A line is read only once every byte up to its newline is written: the file
    starts as NUL bytes and no line holds one."""
    spool = Spool(tmp_path, capacity=4000)
    spool.append(record_of(finish(0), "w"))
    whole = spool.size
    spool.append(record_of(finish(1), "w"))
    line = bytes(spool._map[whole : spool.size])
    spool._map[whole : spool.size] = b"\0" * len(line)  # as if not copied yet ...
    spool._map[whole : whole + 10] = line[:10]  # ... but its start
    spool._map[spool.size - 1 : spool.size] = b"\n"  # and its end
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        drainer = SpoolDrainer(store, tmp_path)
        assert await drainer.drain() == 1
        spool._map[whole : spool.size] = line  # the copy ends
        assert await drainer.drain() == 1
        assert await outputs(store) == [0, 1]
        spool.close(remove=False)
        assert await drainer.drain() == 0
        assert spool_files(tmp_path) == []
        drainer.close()


async def test_while_the_store_is_down_events_wait_in_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 400)
    folder = tmp_path / "spool"
    store = FlakyStore(SqliteHistoryStore(tmp_path / "h.db"))
    recorder = HistoryRecorder(None, spool=folder)
    drainer = SpoolDrainer(store, folder)
    for i in range(10):
        recorder.emit(finish(i))
    store.down = True
    with pytest.raises(ConnectionError):
        await drainer.drain()
    assert store.writes <= 5  # found down in a few calls, not one per event
    assert len(spool_files(folder)) > 1  # nothing deleted unstored
    await recorder.aclose()
    store.down = False
    await drainer.drain()
    assert await outputs(store.inner) == list(range(10))
    assert spool_files(folder) == []
    drainer.close()
    await store.aclose()


async def test_a_restarted_drainer_stores_nothing_twice(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        recorder = HistoryRecorder(None, spool=folder)
        for i in range(4):
            recorder.emit(finish(i))
        first = SpoolDrainer(store, folder)
        await first.drain()
        first.close()  # it dies; the next one reads the files from their start
        recorder.emit(finish(4))
        second = SpoolDrainer(store, folder)
        await second.drain()
        assert await outputs(store) == [0, 1, 2, 3, 4]
        await recorder.aclose()
        await second.drain()
        second.close()
    assert spool_files(folder) == []


_SPOOLS_THEN_DIES = """
import asyncio, os, signal, sys
from flowcraft import FlowEvent
from flowcraft.history import HistoryRecorder
from flowcraft.history import _recorder

_recorder._SPOOL_BYTES = 2000

async def main():
    recorder = HistoryRecorder(None, spool=sys.argv[1])
    for i in range(100):
        recorder.emit(FlowEvent("node:finish", "r", f"n{i}", {"activation": 1, "output": i}))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_killed_worker_s_spool_is_stored_whole_and_deleted(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SPOOLS_THEN_DIES, folder)
    assert await proc.wait() == -signal.SIGKILL
    assert len(spool_files(folder)) > 2
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        drainer = SpoolDrainer(store, folder)
        assert await drainer.drain() == 100
        assert await outputs(store) == list(range(100))
        drainer.close()
    assert spool_files(folder) == []


async def test_runs_recorded_through_a_drainer_read_as_with_a_recorder(tmp_path: Path) -> None:
    """A workflow run with a spool-only recorder and a drainer running beside it: the
    history holds the same events as one written by a recorder with the store."""
    flow = Flow("c").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).edge("a", "b")
    kinds: dict[str, list[str]] = {}
    for name, spool_only in (("direct", False), ("drained", True)):
        async with SqliteHistoryStore(tmp_path / f"{name}.db") as store:
            folder = tmp_path / f"{name}-spool"
            recorder = HistoryRecorder(None if spool_only else store, spool=folder)
            stop = asyncio.Event()
            drainer = SpoolDrainer(store, folder, interval=0.01)
            running = asyncio.create_task(drainer.run(stop))
            worker = InMemoryAdapter(
                runtime_options=RuntimeOptions.from_flows(flow, event_bus=recorder)
            )
            run_id = await worker.start_run("c")
            await worker.run_until_idle()
            await recorder.aclose()
            stop.set()
            await running
            drainer.close()
            kinds[name] = sorted(e.kind for e in await store.events(run_id))
    assert kinds["drained"] == kinds["direct"]
    assert "workflow:finish" in kinds["drained"]


def test_flowcraft_history_drain_once_stores_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    proc = subprocess.run(
        [sys.executable, "-c", _SPOOLS_THEN_DIES, str(folder)], check=False, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    db = tmp_path / "h.db"
    code = "from flowcraft.cli import main; main(prog_name='flowcraft')"
    argv = [sys.executable, "-c", code, "history", "drain", "--store", str(db)]
    drained = subprocess.run(
        [*argv, "--spool", str(folder), "--once"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, "FLOWCRAFT_HISTORY": ""},
    )
    assert drained.returncode == 0, drained.stderr
    assert spool_files(folder) == []
    shown = subprocess.run(
        [sys.executable, "-c", code, "history", "r", "--store", str(db), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    events = json.loads(shown.stdout)["events"]
    assert sorted(e["data"]["output"] for e in events) == list(range(100))


async def test_drained_events_have_the_keys_a_recorder_gives_and_unique_ones_stay_once(
    tmp_path: Path,
) -> None:
    """The worker's short spool line carries no key: the drainer gives the one
    ``event_key`` gives, and an event unique each time (``job:*``) a key from its place
    in the file, so a file read twice (a drainer restarted) stores it once."""
    folder = tmp_path / "spool"
    emitted = [
        FlowEvent("node:start", "r", "a", {"activation": 2, "attempt": 3, "input": [1]}),
        FlowEvent("context:change", "r", "a", {"activation": 2, "key": "k", "value": {"x": 1}}),
        FlowEvent("job:enqueued", "r", "a", {}),  # no activation: unique each time
        FlowEvent("job:enqueued", "r", "a", {}),  # the same, again
        FlowEvent("workflow:finish", "r", None, {"status": "completed"}),
        FlowEvent("custom", "r", None, {"eventId": "e-1", "n": float("nan")}),
    ]
    recorder = HistoryRecorder(None, spool=folder, exclude=(), worker_id="w-1")
    for event in emitted:
        recorder.emit(event)
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        for _ in range(2):  # a drainer, then another reading the same file again
            drainer = SpoolDrainer(store, folder)
            await drainer.drain()
            drainer.close()
        stored = await store.events("r")
        assert [e.kind for e in stored] == [e.type for e in emitted]
        assert [e.worker for e in stored] == ["w-1"] * len(emitted)
        for got, event in zip(stored, emitted, strict=True):
            if not event.type.startswith("job:"):
                assert got.key == event_key(event)
        assert stored[2].key != stored[3].key
        assert (stored[0].activation, stored[0].attempt) == (2, 3)
        assert stored[1].data == {"activation": 2, "key": "k", "value": {"x": 1}}
    await recorder.aclose()


async def test_an_event_larger_than_a_read_is_stored(tmp_path: Path) -> None:
    """A line longer than the drainer reads at once (a 3 MB value) is read whole."""
    folder = tmp_path / "spool"
    recorder = HistoryRecorder(None, spool=folder)
    big = "x" * (3 << 20)
    recorder.emit(finish(0))
    recorder.emit(FlowEvent("node:finish", "r", "big", {"activation": 1, "output": big}))
    recorder.emit(finish(2))
    async with SqliteHistoryStore(tmp_path / "h.db", max_value_bytes=None) as store:
        drainer = SpoolDrainer(store, folder)
        assert await drainer.drain() == 3
        assert await outputs(store) == [0, big, 2]
        await recorder.aclose()
        await drainer.drain()
        drainer.close()
    assert spool_files(folder) == []


@pytest.mark.parametrize(
    "args",
    [
        ["history", "drain", "--spool", "s", "--once", "--store", "mysql://ada:s3cr3t@db/h"],
        ["history", "--store", "mysql://ada:s3cr3t@db/h"],
        ["history", "purge", "--older-than", "1d", "--yes", "--store", "mysql://ada:s3cr3t@db/h"],
        ["worker", "--adapter", "memory", "--flows", "x:y", "--history", "mysql://ada:s3cr3t@db"],
    ],
)
def test_a_history_store_url_no_store_takes_is_bad_input_without_its_password(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from flowcraft.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "mysql://..." in result.output
    assert "s3cr3t" not in result.output
    assert list(tmp_path.iterdir()) == []  # no file made for it


async def test_a_spool_only_recorder_warns_when_nothing_drains_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 300)
    monkeypatch.setattr(recorder_module, "_PILED_UP", 3)
    recorder = HistoryRecorder(None, spool=tmp_path)
    with caplog.at_level("WARNING", logger="flowcraft.history"):
        for i in range(30):
            recorder.emit(finish(i))
    warned = [r for r in caplog.records if "is `flowcraft history drain` running" in r.message]
    assert len(warned) == 1  # once a minute at most
    assert len(spool_files(tmp_path)) > 3
    await recorder.aclose()


class Refusing(FlakyStore):
    """Refuses any batch holding an event of run ``bad`` (as a store refuses a value)."""

    async def write(self, events: list[HistoryEvent]) -> int:
        if any(e.run_id == "bad" for e in events):
            raise ValueError("refused")
        return await super().write(events)


async def test_an_event_the_store_refuses_does_not_hold_back_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "spool"
    recorder = HistoryRecorder(None, spool=folder)
    recorder.emit(finish(0))
    recorder.emit(finish(1, run_id="bad"))
    for i in range(2, 40):
        recorder.emit(finish(i))
    await recorder.aclose()
    store = Refusing(SqliteHistoryStore(tmp_path / "h.db"))
    drainer = SpoolDrainer(store, folder)
    with caplog.at_level("ERROR", logger="flowcraft.history"):
        assert await drainer.drain() == 40  # read: all stored but one, given up on (logged)
    assert await outputs(store.inner) == [0, *range(2, 40)]
    assert store.writes < 20  # halving to the bad one, not one write per event
    assert "node:finish event of run bad not recorded" in caplog.text
    assert spool_files(folder) == []
    drainer.close()
    await store.aclose()
