"""How the history recorder spends its time on the job path: batches that stay whole
under a steady stream, a spool that is a file mapped in memory (set aside when full,
deleted once stored), and event kinds a bus ignores never built by the base."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from flowcraft import CollectingEventBus, Flow, FlowEvent, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter
from flowcraft.events import ignored_kinds, wants
from flowcraft.history import HistoryEvent, HistoryRecorder, SqliteHistoryStore
from flowcraft.history import _recorder as recorder_module
from flowcraft.history._records import execute_rows, record_of
from flowcraft.history._spool import Spool, SpoolFull
from flowcraft.history._spool import read as read_spool


class GatedStore:
    """Keeps what it is given; each write waits until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[list[HistoryEvent]] = []
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def write(self, events: list[HistoryEvent]) -> int:
        self.entered.set()
        await self.gate.wait()
        self.batches.append(list(events))
        return len(events)

    async def events(self, run_id: str) -> list[HistoryEvent]:
        return [e for b in self.batches for e in b if e.run_id == run_id]

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[Any]:
        return []

    async def aclose(self) -> None:
        return None


def spool_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.spool"))


def finish(i: int, run_id: str = "r") -> FlowEvent:
    return FlowEvent("node:finish", run_id, f"n{i}", {"activation": 1, "output": i})


async def test_events_emitted_during_a_write_wait_for_a_batch_of_their_own() -> None:
    """Writing on until the queue is empty would, under a steady stream, store a few
    events per transaction: the ones that come meanwhile wait for the timer, a full
    batch, a flush or the close."""
    store = GatedStore()
    recorder = HistoryRecorder(store, batch_size=5, flush_interval=3600)
    for i in range(5):  # a full batch: written at once
        recorder.emit(finish(i))
    await store.entered.wait()
    for i in range(5, 9):  # while it is written
        recorder.emit(finish(i))
    store.gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert [len(b) for b in store.batches] == [5]  # the 4 wait (the timer is an hour)
    recorder.emit(finish(9))  # now 5 are waiting: a batch
    for _ in range(20):
        await asyncio.sleep(0)
    assert [len(b) for b in store.batches] == [5, 5]
    recorder.emit(finish(10))
    await recorder.flush()
    assert [len(b) for b in store.batches] == [5, 5, 1]
    await recorder.aclose()
    assert [e.node_id for b in store.batches for e in b] == [f"n{i}" for i in range(11)]


async def test_an_event_is_in_the_spool_file_when_emit_returns(tmp_path: Path) -> None:
    store = GatedStore()
    recorder = HistoryRecorder(store, spool=tmp_path, flush_interval=3600)
    await recorder.start()
    recorder.emit(finish(1))
    (path,) = spool_files(tmp_path)
    assert [e.node_id for e in read_spool(path)] == ["n1"]  # no await in between
    store.gate.set()
    await recorder.aclose()
    assert spool_files(tmp_path) == []


async def test_a_full_spool_file_is_set_aside_and_deleted_once_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 1000)
    async with SqliteHistoryStore(tmp_path / "h.db") as store:
        recorder = HistoryRecorder(store, spool=tmp_path / "spool", flush_interval=3600)
        for i in range(40):
            recorder.emit(finish(i))
        files = spool_files(tmp_path / "spool")
        assert len(files) > 2
        assert sum(len(read_spool(f)) for f in files) == 40  # each event in one file
        await recorder.flush()
        assert len(spool_files(tmp_path / "spool")) == 1  # this process's own
        await recorder.aclose()
        assert spool_files(tmp_path / "spool") == []
        assert len(await store.events("r")) == 40


def test_a_line_larger_than_the_spool_file_is_refused_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path, capacity=200)
    big = record_of(FlowEvent("node:finish", "r", "n", {"activation": 1, "output": "x" * 300}))
    with pytest.raises(SpoolFull) as refused:
        spool.append(big)
    assert refused.value.needed > 300
    small = record_of(finish(1))
    spool.append(small)
    assert spool.size < 200
    spool.close(remove=False)
    assert [e.node_id for e in read_spool(spool.path)] == ["n1"]  # then NUL bytes


async def test_a_recorder_spools_an_event_larger_than_a_spool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 500)
    store = GatedStore()
    recorder = HistoryRecorder(store, spool=tmp_path, flush_interval=3600)
    recorder.emit(finish(1))
    recorder.emit(FlowEvent("node:finish", "r", "big", {"activation": 1, "output": "x" * 2000}))
    spooled = [e.node_id for f in spool_files(tmp_path) for e in read_spool(f)]
    assert sorted(spooled, key=str) == ["big", "n1"]
    store.gate.set()
    await recorder.aclose()
    assert spool_files(tmp_path) == []


_DIES_WITH_SEVERAL_SPOOL_FILES = """
import asyncio, os, signal, sys
from flowcraft import FlowEvent
from flowcraft.history import HistoryRecorder, SqliteHistoryStore
from flowcraft.history import _recorder

_recorder._SPOOL_BYTES = 2000

async def main():
    recorder = HistoryRecorder(SqliteHistoryStore(sys.argv[1]), spool=sys.argv[2],
                               flush_interval=3600, batch_size=1000)
    for i in range(100):
        recorder.emit(FlowEvent("node:finish", "spooled", f"n{i}", {"activation": 1, "output": i}))
    os.kill(os.getpid(), signal.SIGKILL)  # with all 100 still queued

asyncio.run(main())
"""


async def test_a_killed_process_leaves_every_spool_file_to_recover(tmp_path: Path) -> None:
    db, spool = tmp_path / "h.db", tmp_path / "spool"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _DIES_WITH_SEVERAL_SPOOL_FILES, str(db), str(spool)
    )
    assert await proc.wait() == -signal.SIGKILL
    assert len(spool_files(spool)) > 2
    async with SqliteHistoryStore(db) as store:
        recorder = HistoryRecorder(store, spool=spool)
        assert await recorder.recover() == 100
        assert sorted(e.data["output"] for e in await store.events("spooled")) == list(range(100))
        await recorder.aclose()
    assert spool_files(spool) == []


class Ignoring(CollectingEventBus):
    ignored_kinds = frozenset({"job:enqueued", "job:processed"})


def chain() -> Flow:
    return Flow("c").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).edge("a", "b")


@pytest.mark.parametrize("ignoring", [True, False])
async def test_the_base_builds_no_event_of_a_kind_its_bus_ignores(ignoring: bool) -> None:
    bus = Ignoring() if ignoring else CollectingEventBus()
    worker = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(chain(), event_bus=bus))
    run_id = await worker.start_run("c")
    await worker.run_until_idle()
    assert (await worker.get_final_result(run_id)) is not None
    kinds = set(bus.types())
    assert {"node:start", "node:finish", "workflow:finish"} <= kinds
    assert ("job:processed" in kinds) is not ignoring
    assert ("job:enqueued" in kinds) is not ignoring


async def test_a_recorder_ignores_what_it_excludes_unless_its_inner_bus_takes_it() -> None:
    store = GatedStore()
    alone = HistoryRecorder(store)
    assert not wants(alone, "job:processed")
    assert wants(alone, "node:finish")
    assert not wants(None, "node:finish")
    inner = CollectingEventBus()
    forwarding = HistoryRecorder(store, inner=inner)
    assert wants(forwarding, "job:processed")  # inner takes everything
    assert ignored_kinds(HistoryRecorder(store, inner=Ignoring())) == {
        "job:enqueued",
        "job:processed",
    }
    assert ignored_kinds(HistoryRecorder(store, inner=Ignoring(), exclude=("job:enqueued",))) == {
        "job:enqueued"
    }


@pytest.mark.parametrize("count", [0, 1, 5, 63, 64, 65, 200])
def test_rows_in_chunks_are_inserted_in_order_as_row_by_row(count: int) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT UNIQUE, v)")
    insert = "INSERT INTO t (k, v) VALUES (?, ?) ON CONFLICT (k) DO NOTHING"
    rows = [(f"k{i}", i) for i in range(count)] + [("k0", "again")] * min(count, 2)
    before = conn.total_changes
    execute_rows(conn, insert, rows)
    assert conn.total_changes - before == count  # the repeats changed nothing
    assert conn.execute("SELECT k, v FROM t ORDER BY seq").fetchall() == rows[:count]
    conn.close()


async def test_an_event_the_spool_cannot_take_still_goes_to_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new spool file that cannot be made (a full disk, say) costs the spool that
    event, never the event: history never stops a workflow."""
    monkeypatch.setattr(recorder_module, "_SPOOL_BYTES", 300)
    store = GatedStore()
    recorder = HistoryRecorder(store, spool=tmp_path, flush_interval=3600)
    await recorder.start()

    def no_space(*args: Any, **kwargs: Any) -> Spool:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder_module, "Spool", no_space)
    for i in range(5):  # more than one 300-byte file holds
        recorder.emit(finish(i))
    store.gate.set()
    await recorder.aclose()
    assert [e.node_id for b in store.batches for e in b] == [f"n{i}" for i in range(5)]


def batch(run_id: str, count: int, start: int = 0) -> list[HistoryEvent]:
    return [record_of(finish(i, run_id), "w") for i in range(start, start + count)]


async def test_a_write_waits_on_the_thread_while_another_connection_holds_the_file(
    tmp_path: Path,
) -> None:
    """The loop's connection never waits: while another process writes, the batch goes
    to the store's thread (which waits for the file) and the event loop runs on."""
    path = tmp_path / "h.db"
    async with SqliteHistoryStore(path) as store:
        await store.write(batch("a", 3))  # the first write makes the loop's connection
        assert store._here is not None
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        writing = asyncio.ensure_future(store.write(batch("b", 5)))
        ticks = 0
        for _ in range(20):  # the loop is free while the write waits
            await asyncio.sleep(0.01)
            ticks += 1
        assert not writing.done()
        holder.execute("COMMIT")
        holder.close()
        assert await asyncio.wait_for(writing, 10) == 5
        assert ticks == 20
        assert [e.node_id for e in await store.events("b")] == [f"n{i}" for i in range(5)]
        assert await store.write(batch("b", 2, start=5)) == 2  # the loop's connection again
        assert len(await store.events("b")) == 7


def file_sizes(path: Path) -> tuple[int, int]:
    """The database file's size and its WAL's."""
    return path.stat().st_size, Path(f"{path}-wal").stat().st_size


async def test_writes_on_the_loop_yield_and_keep_the_wal_small(tmp_path: Path) -> None:
    """Each write is a suspension point (a loop of writes lets other tasks run), and
    the thread's checkpoints keep the WAL from growing with everything written."""
    path = tmp_path / "h.db"
    ran = 0

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(other())
    try:
        async with SqliteHistoryStore(path) as store:
            for i in range(80):
                await store.write(batch(f"r{i}", 500))
            assert ran >= 70
            size, wal = file_sizes(path)
            assert len(await store.events("r79")) == 500
    finally:
        task.cancel()
    assert size > 4 * wal, (size, wal)  # without the checkpoints: wal > size


@pytest.mark.parametrize("on_loop", [True, False])
async def test_the_store_holds_the_same_either_way(tmp_path: Path, on_loop: bool) -> None:
    async with SqliteHistoryStore(tmp_path / "h.db", write_on_loop=on_loop) as store:
        assert await store.write(batch("r", 10)) == 10
        assert await store.write(batch("r", 12)) == 2  # 10 of them stored already
        assert (store._here is not None) is on_loop
        assert [e.node_id for e in await store.events("r")] == [f"n{i}" for i in range(12)]


async def test_an_in_memory_store_keeps_one_connection() -> None:
    async with SqliteHistoryStore(":memory:") as store:
        await store.write(batch("r", 3))
        await store.write(batch("r", 3, start=3))
        assert store._here is None
        assert len(await store.events("r")) == 6
