"""BullMQ adapter benchmark: node jobs per second and Redis commands per node job.

    uv run python benchmarks/bench_bullmq.py             # table, then JSON
    uv run python benchmarks/bench_bullmq.py --json      # one JSON object only
    uv run python benchmarks/bench_bullmq.py --url redis://127.0.0.1:6379/0 --runs 200

Redis: ``--url``, else ``FLOWCRAFT_TEST_REDIS_URL``, else a local server started by
``flowcraft_backends`` (and stopped at the end). Workers are separate processes
(this file with ``--worker``), each one ``BullMQAdapter`` running ``worker()``.

Throughput pass, per shape (``chain``: 10 nodes; ``diamond``: start, 16 parallel
nodes, an ``all`` join, end = 19 nodes) and per worker count (1, 2): ``--runs``
runs are created with ``start_run`` while the BullMQ queue is paused, then the
queue is resumed: all runs start at once, at t0, and the driver's own CPU does not
compete with the workers. The pass ends when every run's result is published.
``node_jobs_per_s`` = runs x nodes / (last publication - t0); run latency = a run's
publication time (stamped by the worker that published it) - t0.
``worker_cpu_s``/``redis_cpu_s``: CPU seconds each process used in the pass;
``worker_cpu_ms_per_node_job``: all workers' CPU per node job, the figure that moves
least with the machine's load (throughput also waits on Redis and the scheduler);
``worker_main_thread_cpu_ms_per_node_job``: the part of it the workers' event-loop
threads used (the rest is other threads: run history's store writer, say).
``server_cmds_per_node_job``: every command Redis executed in the pass (INFO
commandstats: what clients sent plus what scripts ran), divided by node jobs.

Cost pass (1 worker, MONITOR on, so not timed): Redis's MONITOR marks commands run
inside scripts (``[0 lua]``); every other command came from a client. Commands from
the driver (start_run, result polling) are left out by connection name, so the
figures are the workers' own, per node job: ``client_cmds`` (EVALSHA counts 1) and
``in_script_cmds``. ``marginal_client_cmds_per_chain_job`` = (chain-20 - chain-10
commands) / (runs x 10): what one more non-join node job costs, with start and
finalization left out. BullMQ's own periodic commands (lock renewal every second
per active job, the stalled check every 2 s, the idle ``BZPOPMIN``) are included.

``--history`` runs every throughput pass again with run history, interleaved, once
per ``--history-bus`` (default ``drainer,recorder``): ``drainer``, the workers only
append each event to a spool file and one ``flowcraft history drain`` process stores
them in one SQLite file (``flowcraft worker --history-drainer``); ``recorder``, each
worker writes the SQLite file itself through a ``HistoryRecorder`` with a spool. It
reports ``history_vs_off``: per shape, worker count and bus, the median node jobs/s
with history over without (the bound: above 0.9), the workers' CPU per node job, and
the drainer's own.

``--original`` runs the original TypeScript engine's bench (``benchmarks/original``,
``npm ci`` there first) right after each of our passes, same shape, workers, runs and
concurrency, same Redis, and its cost pass after ours: ``vs_original`` gives the
ratios. ``--rounds N`` repeats the throughput passes (interleaved with the original's),
for medians on a machine whose speed drifts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import redis.asyncio as redis_asyncio
from bullmq import Queue

from flowcraft import Flow, RuntimeOptions
from flowcraft.history import HistoryRecorder, SqliteHistoryStore
from flowcraft_bullmq import BullMQAdapter

TARGET_NODE_JOBS_PER_S = 1400
TARGET_CLIENT_CMDS_PER_JOB = 5
# The figures for the original (measured on a busy machine); --original
# measures it side by side instead.
ORIGINAL = {"node_jobs_per_s": 700, "client_cmds_per_node_job": 9.4}
DRIVER_NAME = "fc-bench-driver"
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the flows


def _first(ctx: Any) -> int:
    return 1


def _next(ctx: Any) -> Any:
    return ctx.input + 1


def _sum(ctx: Any) -> Any:
    return sum(ctx.input.values())


def chain(n: int) -> Flow:
    flow = Flow(f"chain{n}").node("n0", _first)
    for i in range(1, n):
        flow.node(f"n{i}", _next).edge(f"n{i - 1}", f"n{i}")
    return flow


def diamond(width: int = 16) -> Flow:
    flow = Flow("diamond").node("start", _first).node("join", _sum).node("end", _next)
    for i in range(width):
        flow.node(f"b{i}", _next).edge("start", f"b{i}").edge(f"b{i}", "join")
    return flow.edge("join", "end")


FLOWS = {"chain": chain(10), "chain20": chain(20), "diamond": diamond()}
NODES = {"chain": 10, "chain20": 20, "diamond": 19}


def runtime_options(**options: Any) -> RuntimeOptions:
    return RuntimeOptions.from_flows(*FLOWS.values(), **options)


def adapter(
    url: str, prefix: str, name: str, options: RuntimeOptions | None = None, **settings: Any
) -> BullMQAdapter:
    return BullMQAdapter(
        runtime_options=options or runtime_options(),
        connection=url,
        key_prefix=prefix,
        redis_options={"client_name": name},
        reconcile_interval_seconds=None,
        **settings,
    )


# ---------------------------------------------------------------- worker process


class _DropBus:
    """A bus that keeps nothing: what the base's event building costs by itself."""

    def emit(self, event: Any) -> None:
        return None


class _NoStore:
    """A history store that keeps nothing: the recorder's cost without SQLite's."""

    async def write(self, events: list[Any]) -> int:
        return len(events)

    async def events(self, run_id: str) -> list[Any]:
        return []

    async def runs(self, *, limit: int = 20, status: str | None = None) -> list[Any]:
        return []

    async def aclose(self) -> None:
        return None


HISTORY_BUSES = ("recorder", "drop", "nostore", "nospool", "thread", "drainer")


async def worker_main(
    url: str,
    prefix: str,
    concurrency: int,
    fast_path: bool,
    history: str | None = None,
    bus: str = "recorder",
) -> None:
    store: Any = None
    recorder: HistoryRecorder | None = None
    options = None
    if history and bus == "drop":
        options = runtime_options(event_bus=_DropBus())
    elif history and bus == "drainer":  # the spool only: the pass's drainer stores it
        recorder = HistoryRecorder(None, spool=Path(history).with_suffix(".spool"))
        options = runtime_options(event_bus=recorder)
        await recorder.start()
    elif history:
        store = (
            _NoStore()
            if bus == "nostore"
            else SqliteHistoryStore(history, write_on_loop=bus != "thread")
        )
        # The spool (beside the file) keeps what a killed worker had queued.
        spool = None if bus == "nospool" else Path(history).with_suffix(".spool")
        recorder = HistoryRecorder(store, spool=spool)
        options = runtime_options(event_bus=recorder)
        # Started, and the store opened, before the first job: a long-lived worker's
        # start-up (the store's tables, the spool file) is not the job path's cost.
        await store.runs(limit=1)
        await recorder.start()
    worker = adapter(
        url, prefix, "fc-bench-worker", options, concurrency=concurrency, fast_path=fast_path
    )
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(worker.stop()))
    task = asyncio.ensure_future(worker.worker())
    print("ready", flush=True)
    await task
    await worker.aclose()
    if recorder is not None:
        await recorder.aclose()
    if store is not None:
        await store.aclose()


def worker_of(args: argparse.Namespace) -> Coroutine[Any, Any, None]:
    """A worker process's main coroutine, from its command line."""
    return worker_main(
        args.url,
        args.prefix,
        args.concurrency,
        not args.no_fast_path,
        args.history_db,
        args.history_bus,
    )


def profiled_worker(args: argparse.Namespace) -> None:
    """The worker under cProfile, its statistics written to ``--profile DIR`` on exit."""
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        asyncio.run(worker_of(args))
    finally:
        profile.disable()
        profile.dump_stats(str(Path(args.profile) / f"worker-{os.getpid()}.prof"))


# ---------------------------------------------------------------- driver


class Workers:
    profile: str | None = None  # --profile: workers write cProfile statistics there

    def __init__(
        self,
        url: str,
        prefix: str,
        count: int,
        concurrency: int,
        fast: bool,
        history: str | None = None,
        bus: str = "recorder",
    ) -> None:
        argv = [sys.executable, __file__, "--worker", "--url", url, "--prefix", prefix]
        argv += ["--concurrency", str(concurrency)]
        if history:
            argv += ["--history-db", history, "--history-bus", bus]
        if not fast:
            argv.append("--no-fast-path")
        if self.profile:
            argv += ["--profile", self.profile]
        self.procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(count)
        ]
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker process did not start")

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_drainer(history: str) -> subprocess.Popen[bytes]:
    """The machine's one history writer: stores what the workers spool."""
    spool = str(Path(history).with_suffix(".spool"))
    code = "from flowcraft.cli import main; main()"
    argv = [sys.executable, "-c", code, "history", "drain", "--store", history, "--spool", spool]
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL)


async def start_runs(client: BullMQAdapter, shape: str, runs: int) -> dict[str, float]:
    started: dict[str, float] = {}

    async def one() -> None:
        t = time.time()
        run_id = await client.start_run(FLOWS[shape].id)
        started[run_id] = t

    await asyncio.gather(*(one() for _ in range(runs)))
    return started


async def wait_published(
    redis: Any, client: BullMQAdapter, started: dict[str, float], seconds: float
) -> dict[str, float]:
    """Publication time of every run (bulk MGET of the result keys)."""
    published: dict[str, float] = {}
    pending = list(started)
    deadline = time.monotonic() + seconds
    while pending:
        values = await redis.mget([client.keys.result(r) for r in pending])
        still = []
        for run_id, raw in zip(pending, values, strict=True):
            if raw is None:
                still.append(run_id)
                continue
            record = json.loads(raw)
            if record["status"] != "completed":
                raise RuntimeError(f"run {run_id} ended {record['status']}: {record['errors']}")
            published[run_id] = record["publishedAt"]
        pending = still
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} runs did not finish in {seconds} s")
            await asyncio.sleep(0.02)
    return published


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a local process, or of one of its threads (0 if it is
    not local)."""
    where = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(where).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commandstats(info: dict[str, Any]) -> Counter[str]:
    calls: Counter[str] = Counter()
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            calls[key[8:]] = int(value["calls"])
    return calls


async def drop(redis: Any, prefix: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{prefix}*", count=2000)]
    for i in range(0, len(keys), 1000):
        await redis.delete(*keys[i : i + 1000])


async def throughput(
    url: str,
    shape: str,
    workers: int,
    runs: int,
    concurrency: int,
    fast: bool,
    history: str | None = None,
    bus: str = "recorder",
) -> dict[str, Any]:
    """One pass; with ``history`` (a SQLite file), the workers record through ``bus``
    (one of HISTORY_BUSES)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    redis = redis_asyncio.Redis.from_url(url, client_name=DRIVER_NAME)
    recording = None
    if history:  # the driver's start_run records the runs' starts
        recording = HistoryRecorder(SqliteHistoryStore(history))
        client = adapter(url, prefix, DRIVER_NAME, runtime_options(event_bus=recording))
    else:
        client = adapter(url, prefix, DRIVER_NAME)
    procs = Workers(url, prefix, workers, concurrency, fast, history, bus)
    drainer = start_drainer(history) if history and bus == "drainer" else None
    redis_pid = int((await redis.info("server"))["process_id"])
    queue = Queue(client.settings.queue_name, {"connection": url, "prefix": f"{prefix}bull"})
    try:
        # The runs are created while the queue is paused, so the driver's own work
        # (start_run) does not compete with the workers for the CPU; resuming the
        # queue releases them all at once.
        await queue.pause()
        started = await start_runs(client, shape, runs)
        await asyncio.sleep(0.5)
        await redis.config_resetstat()
        cpu_before = [cpu_seconds(p.pid) for p in procs.procs] + [cpu_seconds(redis_pid)]
        drainer_before = cpu_seconds(drainer.pid) if drainer is not None else 0.0
        main_before = sum(cpu_seconds(p.pid, p.pid) for p in procs.procs)
        t0 = time.time()
        await queue.resume()
        started = dict.fromkeys(started, t0)
        published = await wait_published(redis, client, started, seconds=300)
        cpu_after = [cpu_seconds(p.pid) for p in procs.procs] + [cpu_seconds(redis_pid)]
        drainer_cpu = cpu_seconds(drainer.pid) - drainer_before if drainer is not None else 0.0
        main_cpu = sum(cpu_seconds(p.pid, p.pid) for p in procs.procs) - main_before
        stats = commandstats(await redis.info("commandstats"))
    finally:
        procs.stop()
        if drainer is not None:  # a last pass, then it exits
            drainer.send_signal(signal.SIGTERM)
            drainer.wait(60)
        await queue.close()
        await client.aclose()
        await drop(redis, prefix)
        await redis.aclose()
        if recording is not None:
            await recording.aclose()
            await recording.store.aclose()
    first = min(started.values())
    last = max(published.values())
    latencies = sorted(published[r] - started[r] for r in started)
    jobs = runs * NODES[shape]
    elapsed = last - first
    ignored = {"info", "config|resetstat", "mget", "client|setname", "client|setinfo"}
    server_cmds = sum(v for k, v in stats.items() if k not in ignored)
    recorded = None
    if history and bus in ("recorder", "nospool", "thread", "drainer"):
        recorded = await recorded_runs(history, started)
    elif history:
        recorded = {}
    return {
        "history": recorded,
        "bus": bus if history else None,
        "shape": shape,
        "nodes": NODES[shape],
        "workers": workers,
        "runs": runs,
        "fast_path": fast,
        "elapsed_s": round(elapsed, 3),
        "node_jobs_per_s": round(jobs / elapsed, 1),
        "runs_per_s": round(runs / elapsed, 1),
        "p50_latency_ms": round(1000 * statistics.median(latencies), 1),
        "p95_latency_ms": round(1000 * latencies[int(0.95 * (len(latencies) - 1))], 1),
        "server_cmds_per_node_job": round(server_cmds / jobs, 2),
        "worker_cpu_s": [round(a - b, 2) for a, b in zip(cpu_after[:-1], cpu_before, strict=False)],
        "worker_cpu_ms_per_node_job": round(
            1000 * sum(a - b for a, b in zip(cpu_after[:-1], cpu_before, strict=False)) / jobs, 3
        ),
        "worker_main_thread_cpu_ms_per_node_job": round(1000 * main_cpu / jobs, 3),
        "redis_cpu_s": round(cpu_after[-1] - cpu_before[-1], 2),
        **({"drainer_cpu_ms_per_node_job": round(1000 * drainer_cpu / jobs, 3)} if drainer else {}),
    }


async def recorded_runs(path: str, started: dict[str, float]) -> dict[str, int]:
    """What the workers' history holds of this pass's runs: runs whose history has
    their start, every node's finish and their completion."""
    complete = 0
    events = 0
    async with SqliteHistoryStore(path) as store:
        for run_id in started:
            found = await store.events(run_id)
            events += len(found)
            kinds = [e.kind for e in found]
            if (
                "workflow:start" in kinds
                and "workflow:finish" in kinds
                and len({e.node_id for e in found if e.kind == "node:finish"})
                == len(FLOWS[_shape_of(found)].to_blueprint().nodes)
            ):
                complete += 1
    return {"complete_runs": complete, "events": events}


def _shape_of(events: list[Any]) -> str:
    start = next(e for e in events if e.kind == "workflow:start")
    blueprint = start.data["blueprintId"]
    return next(name for name, flow in FLOWS.items() if flow.to_blueprint().id == blueprint)


_MONITOR_LINE = re.compile(r'^[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"')


async def monitored(url: str, shape: str, runs: int, fast: bool) -> dict[str, Any]:
    """One worker, MONITOR on: the workers' client-issued and in-script commands."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    redis = redis_asyncio.Redis.from_url(url, client_name=DRIVER_NAME, decode_responses=True)
    client = adapter(url, prefix, DRIVER_NAME)
    procs = Workers(url, prefix, 1, 32, fast)
    where = redis.connection_pool.connection_kwargs
    cli = subprocess.Popen(  # noqa: ASYNC220 (started once, read in a thread)
        ["redis-cli", "-h", str(where["host"]), "-p", str(where["port"]), "monitor"],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        await asyncio.sleep(0.5)
        assert cli.stdout is not None
        cli.stdout.readline()  # "OK"
        reader = asyncio.get_running_loop().run_in_executor(None, _read_all, cli.stdout, lines)
        started = await start_runs(client, shape, runs)
        await wait_published(redis, client, started, seconds=300)
        clients = await redis.client_list()
    finally:
        cli.terminate()
        with contextlib.suppress(Exception):
            await reader
        cli.wait(10)
        procs.stop()
        await client.aclose()
        await drop(redis, prefix)
        await redis.aclose()
    driver_addrs = {c["addr"] for c in clients if c.get("name") == DRIVER_NAME}
    outside: Counter[str] = Counter()
    inside: Counter[str] = Counter()
    for line in lines:
        match = _MONITOR_LINE.match(line)
        if not match:
            continue
        source, command = match.group(1), match.group(2).lower()
        if source == "lua":
            inside[command] += 1
        elif source not in driver_addrs:
            outside[command] += 1
    jobs = runs * NODES[shape]
    return {
        "shape": shape,
        "runs": runs,
        "fast_path": fast,
        "client_cmds_per_node_job": round(sum(outside.values()) / jobs, 2),
        "in_script_cmds_per_node_job": round(sum(inside.values()) / jobs, 2),
        "client_cmds": dict(outside.most_common()),
        "client_cmds_total": sum(outside.values()),
        "in_script_total": sum(inside.values()),
    }


def _read_all(stream: Any, out: list[str]) -> None:
    for line in stream:
        out.append(line)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url or os.environ.get("FLOWCRAFT_TEST_REDIS_URL")
    pool = None
    if url is None:
        sys.path.insert(0, str(REPO / "tests-integration" / "src"))
        from flowcraft_backends._pool import ServicePool

        pool = ServicePool()
        url = pool.get("redis").url
    fast = not args.no_fast_path
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "targets": {
            "node_jobs_per_s_1_worker": TARGET_NODE_JOBS_PER_S,
            "client_cmds_per_non_join_node_job": TARGET_CLIENT_CMDS_PER_JOB,
            "original": ORIGINAL,
        },
        "throughput": [],
        "cost": [],
    }
    if args.original:
        report["original"] = {"throughput": [], "cost": []}
    try:
        for _ in range(args.rounds):
            for shape in args.shapes.split(","):
                for workers in (int(w) for w in args.workers.split(",")):
                    row = await throughput(url, shape, workers, args.runs, args.concurrency, fast)
                    report["throughput"].append(row)
                    if not args.json:
                        print(json.dumps(row), file=sys.stderr)
                    for bus in args.history_bus.split(",") if args.history else ():
                        with tempfile.TemporaryDirectory() as folder:
                            path = str(Path(folder) / "history.db")
                            row = await throughput(
                                url, shape, workers, args.runs, args.concurrency, fast, path, bus
                            )
                        report["throughput"].append(row)
                        if not args.json:
                            print("history", json.dumps(row), file=sys.stderr)
                    if args.original:
                        theirs = original(url, args, shapes=shape, workers=workers)["throughput"]
                        report["original"]["throughput"] += theirs
                        if not args.json:
                            print("original", json.dumps(theirs[0]), file=sys.stderr)
        if not args.no_monitor:
            costs = {}
            for shape in ("chain", "chain20", "diamond"):
                costs[shape] = await monitored(url, shape, args.cost_runs, fast)
                report["cost"].append(costs[shape])
                if not args.json:
                    print(json.dumps(costs[shape]), file=sys.stderr)
            extra = costs["chain20"]["client_cmds_total"] - costs["chain"]["client_cmds_total"]
            report["marginal_client_cmds_per_chain_job"] = round(extra / (args.cost_runs * 10), 2)
            extra_in = costs["chain20"]["in_script_total"] - costs["chain"]["in_script_total"]
            report["marginal_in_script_cmds_per_chain_job"] = round(
                extra_in / (args.cost_runs * 10), 2
            )
            if args.original:
                theirs = original(url, args, shapes="", workers=1)
                report["original"]["cost"] = theirs["cost"]
                for key in theirs:
                    if key.startswith("marginal_"):
                        report["original"][key] = theirs[key]
        if args.original:
            report["vs_original"] = compare(report)
        if args.history:
            report["history_vs_off"] = history_ratio(report["throughput"])
    finally:
        if pool is not None:
            pool.stop_all()
    return report


ORIGINAL_BENCH = REPO / "benchmarks" / "original" / "bench.mjs"


def original(url: str, args: argparse.Namespace, *, shapes: str, workers: int) -> dict[str, Any]:
    """The original engine's bench (Node) on the same Redis: its JSON report."""
    if not (ORIGINAL_BENCH.parent / "node_modules").is_dir():
        raise SystemExit(f"--original: run `npm ci --prefix {ORIGINAL_BENCH.parent}` first")
    argv = ["node", str(ORIGINAL_BENCH), "--url", url, "--json", "--shapes", shapes]
    argv += ["--workers", str(workers), "--runs", str(args.runs)]
    argv += ["--concurrency", str(args.concurrency), "--cost-runs", str(args.cost_runs)]
    if shapes:
        argv.append("--no-monitor")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"the original's bench failed:\n{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def history_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape, worker count and history bus: median node jobs/s with history over
    without (the passes without history of the same shape and worker count)."""
    out: list[dict[str, Any]] = []
    cells = dict.fromkeys((r["shape"], r["workers"], r["bus"]) for r in rows if r["bus"])
    for shape, workers, bus in cells:
        off_rows = [
            r for r in rows if (r["shape"], r["workers"]) == (shape, workers) and not r["bus"]
        ]
        on_rows = [r for r in rows if (r["shape"], r["workers"], r["bus"]) == (shape, workers, bus)]

        def median(key: str, of: list[dict[str, Any]]) -> float:
            return float(statistics.median(r[key] for r in of))

        on, off = median("node_jobs_per_s", on_rows), median("node_jobs_per_s", off_rows)
        cpu_on = median("worker_cpu_ms_per_node_job", on_rows)
        cpu_off = median("worker_cpu_ms_per_node_job", off_rows)
        cell: dict[str, Any] = {
            "shape": shape,
            "workers": workers,
            "bus": bus,
            "rounds": len(on_rows),
            "node_jobs_per_s": {"off": off, "on": on, "ratio": round(on / off, 3)},
            "worker_cpu_ms_per_node_job": {
                "off": cpu_off,
                "on": cpu_on,
                "ratio": round(cpu_on / cpu_off, 3),
            },
            "worker_main_thread_cpu_ms_per_node_job": {
                "off": median("worker_main_thread_cpu_ms_per_node_job", off_rows),
                "on": median("worker_main_thread_cpu_ms_per_node_job", on_rows),
            },
            "ratios_per_round": [
                round(a["node_jobs_per_s"] / b["node_jobs_per_s"], 3)
                for a, b in zip(on_rows, off_rows, strict=False)
            ],
        }
        if bus == "drainer":
            cell["drainer_cpu_ms_per_node_job"] = median("drainer_cpu_ms_per_node_job", on_rows)
        out.append(cell)
    return out


def compare(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per shape and worker count: medians of ours and the original's, and their ratio."""
    rows: list[dict[str, Any]] = []
    ours = report["throughput"]
    theirs = report["original"]["throughput"]
    for shape, workers in dict.fromkeys((r["shape"], r["workers"]) for r in ours):
        mine = [r for r in ours if (r["shape"], r["workers"]) == (shape, workers)]
        other = [r for r in theirs if (r["shape"], r["workers"]) == (shape, workers)]
        row: dict[str, Any] = {"shape": shape, "workers": workers, "rounds": len(mine)}
        for key in ("node_jobs_per_s", "worker_cpu_ms_per_node_job", "p50_latency_ms"):
            a = statistics.median(r[key] for r in mine)
            b = statistics.median(r[key] for r in other)
            row[key] = {"ours": a, "original": b, "ratio": round(a / b, 2)}
        rows.append(row)
    cost = report.get("marginal_client_cmds_per_chain_job")
    if cost is not None and "marginal_client_cmds_per_chain_job" in report["original"]:
        rows.append(
            {
                "marginal_client_cmds_per_chain_job": {
                    "ours": cost,
                    "original": report["original"]["marginal_client_cmds_per_chain_job"],
                }
            }
        )
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print only one JSON object")
    parser.add_argument("--url", help="Redis URL (default: env, else a local server)")
    parser.add_argument("--runs", type=int, default=200, help="runs started at once per pass")
    parser.add_argument("--cost-runs", type=int, default=200, help="runs in the MONITOR pass")
    parser.add_argument("--concurrency", type=int, default=32, help="jobs per worker at once")
    parser.add_argument("--no-fast-path", action="store_true", help="the base protocol's calls")
    parser.add_argument("--no-monitor", action="store_true", help="skip the cost pass")
    parser.add_argument("--shapes", default="chain,diamond", help="throughput shapes")
    parser.add_argument("--workers", default="1,2", help="worker process counts")
    parser.add_argument("--profile", metavar="DIR", help="workers write cProfile stats to DIR")
    parser.add_argument("--original", action="store_true", help="also the original, interleaved")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the throughput passes")
    parser.add_argument(
        "--history", action="store_true", help="each pass also with run history, interleaved"
    )
    parser.add_argument(
        "--history-bus",
        default="drainer,recorder",
        help="what --history runs in the workers (several, comma-separated: each a pass of "
        "its own per round, interleaved): the recorder (SQLite, spool); drop: a bus "
        "that keeps nothing (the base's events alone); nostore: the recorder with a store "
        "that keeps nothing; nospool: the recorder without its spool; thread: the recorder "
        "writing SQLite on the store's thread only; drainer: the workers only spool, one "
        "`flowcraft history drain` process stores",
    )
    parser.add_argument("--history-db", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.profile:
            profiled_worker(args)
        else:
            asyncio.run(worker_of(args))
        return
    Workers.profile = args.profile
    buses = args.history_bus.split(",")
    if not set(buses) <= set(HISTORY_BUSES):
        parser.error(f"--history-bus: each of {', '.join(HISTORY_BUSES)}")
    report = asyncio.run(main(args))
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    cli()
