"""RabbitMQ adapter benchmark: real RabbitMQ, PostgreSQL and Redis, worker processes.

    uv run python benchmarks/bench_rabbitmq.py                 # table
    uv run python benchmarks/bench_rabbitmq.py --json          # one JSON object
    uv run python benchmarks/bench_rabbitmq.py --runs 50 --workers 2 --shapes diamond
    uv run --with celery python benchmarks/bench_rabbitmq.py --celery --rounds 3

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started
at once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are
trivial, so the figures are the adapter's and the servers' cost.

Columns: ``jobs/s`` node jobs handled per second over the span from the first run's
start to the last run's end (PostgreSQL timestamps); ``p50``/``p95`` run latency of
those runs (start to final result, ms: mostly queueing, as all start at once);
``solo ms`` the median latency of 20 more runs started one at a time (start_run to
wait_for_result returning); ``cpu ms`` the workers' CPU time (user + system, all
their processes) per node job over the pass, the figure that moves least with the
machine's load; ``all ms`` the whole machine's busy CPU time per node job over the
pass (workers, RabbitMQ, PostgreSQL, Redis and this driver: meaningful on a quiet
machine only; ``--json`` also gives each server's share, ``server_cpu_ms_per_job``,
by process name); ``rabbit``, ``pg``, ``redis``: round trips per node job handled, counted
in the workers (RabbitMQ: confirmed publishes and declarations; acks are one-way
frames and are shown apart as ``acks``; PostgreSQL: statements; Redis: coordination
operations, a pipeline of follow-up marks counting once).

``--celery`` runs Celery (5.x, installed only for the benchmark: ``uv run --with
celery``) right after each of our passes, on the same RabbitMQ, the same shapes, runs
and worker processes, and the same concurrency per worker (prefork, ``-c 8``): a
``chain`` of 10 tasks and a ``chain(start, chord(16 tasks, join), end)``, with Celery's
defaults otherwise (``rpc://`` results for the chain, Redis for the chord, which
``rpc://`` refuses; ``--celery-results redis`` puts both in Redis). A run ends when its
last task has run (it records the time in Redis). Both sides first run 2 runs per
concurrency slot, unmeasured: Celery's prefork children finish starting on their first
tasks (without it, Celery's chain cost 2.9 ms per job with 200 runs and 1.6 with
1000). ``--rounds N`` repeats the
interleaved passes; the table then shows each side's median and range and the ratio
of the medians (``x celery``).

``--concurrency N`` sets the jobs at once per worker process on both sides (our
``concurrency``, Celery's ``-c``; default 8). ``--prefetch N`` sets our workers'
prefetch (default: the concurrency); ``--uvloop``
runs our workers on uvloop (``uv run --with uvloop``); ``--no-solo`` skips the solo
runs.

Backends: the ``FLOWCRAFT_TEST_{RABBITMQ,POSTGRES,REDIS}_URL`` variables if set,
else started here by ``flowcraft_backends`` (and stopped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _workloads import (
    BRANCHES,
    CHAIN,
    CONCURRENCY,
    JOBS_PER_RUN,
    JobCounter,
    WorkerProcesses,
    flows,
    latency_summary,
    main,
    serve,
    until,
)

from flowcraft.distributed import RedisCoordinationStore
from flowcraft_rabbitmq import RabbitMQAdapter

SOLO_RUNS = 20


class CountingStore(RedisCoordinationStore):
    """The Redis coordination store, counting its operations (each one round trip)."""

    ops = 0

    async def increment(self, key: str, ttl_seconds: float) -> int:
        self.ops += 1
        return await super().increment(key, ttl_seconds)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        self.ops += 1
        return await super().set_if_not_exist(key, value, ttl_seconds)

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        self.ops += 1
        return await super().extend_ttl(key, ttl_seconds)

    async def delete(self, key: str) -> None:
        self.ops += 1
        await super().delete(key)

    async def get(self, key: str) -> str | None:
        self.ops += 1
        return await super().get(key)

    async def delete_many(self, keys: Sequence[str]) -> None:
        self.ops += 1
        await super().delete_many(keys)


def adapter_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "amqp_url": config["amqp_url"],
        "postgres_dsn": config["postgres_dsn"],
        "queue_name": config["queue"],
        "table": config["table"],
        "key_prefix": config["prefix"],
        "concurrency": config.get("concurrency", CONCURRENCY),
        **({"prefetch": config["prefetch"]} if config.get("prefetch") else {}),
    }


async def worker_main(config: dict[str, Any]) -> dict[str, int]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    store = CountingStore(url=config["redis_url"], key_prefix="")
    adapter = RabbitMQAdapter(
        runtime_options=flows(), coordination_store=store, **adapter_options(config)
    )
    counter = JobCounter(adapter)
    await adapter.connect()
    try:
        await serve(adapter, config)
    finally:
        await adapter.aclose()
        await store.aclose()
    trips = adapter.broker.round_trips
    return {
        "jobs": counter.jobs,
        "rabbitmq": trips["publish"] + trips["declare"],
        "acks": trips["ack"],
        "postgres": sum(adapter.store.round_trips.values()),
        "redis": store.ops + adapter._marks.batches,
    }


SERVERS = {"beam.smp": "rabbitmq", "postgres": "postgres", "redis-server": "redis"}
"""The servers' processes, by command name."""


def cpu_snapshot(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far (user + system), from one reading of /proc: ``workers`` (these
    processes and all their descendants), each server of :data:`SERVERS`, and
    ``machine``, the whole machine's busy time (every core; /proc/stat's first line
    less idle and iowait)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    found = dict.fromkeys(SERVERS.values(), 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            head, rest = (entry / "stat").read_text().rsplit(")", 1)
        except (OSError, ValueError):
            continue
        fields = rest.split()
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
        server = SERVERS.get(head.split("(", 1)[1])
        if server is not None:
            found[server] += cpu[pid]
    wanted = set(pids)
    grew = True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in wanted} - wanted
        wanted |= more
        grew = bool(more)
    found["workers"] = sum(cpu.get(pid, 0.0) for pid in wanted)
    stat = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    found["machine"] = (sum(stat[:8]) - stat[3] - stat[4]) / tick  # user..steal
    return found


def cpu_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, Any]:
    """A pass's CPU figures per node job (ms): the workers', the machine's, each server's."""
    ms = {k: round(1000 * (after[k] - before[k]) / jobs, 3) for k in before}
    return {
        "cpu_ms_per_job": ms["workers"],
        "machine_cpu_ms_per_job": ms["machine"],
        "server_cpu_ms_per_job": {server: ms[server] for server in SERVERS.values()},
    }


async def measure_ours(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    runs = args.runs
    tag = uuid.uuid4().hex[:10]
    base = {**urls, "queue": f"bench-{tag}", "table": f"bench_{tag}", "prefix": f"bench:{tag}:"}
    base["prefetch"] = args.prefetch
    base["concurrency"] = args.concurrency
    base["uvloop"] = args.uvloop
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-rabbitmq-")
    client = RabbitMQAdapter(
        runtime_options=flows(), redis_url=urls["redis_url"], **adapter_options(base)
    )
    pids = [p.pid for p in procs.procs]
    try:
        await procs.ready()
        await client.connect()
        pool = await client.store.pool()
        runs_table = client.store.names.runs
        finished = f"SELECT count(*) FROM {runs_table} WHERE result IS NOT NULL"
        # Warmed up as Celery's workers are (see measure_celery), then measured.
        warm_ids = [uuid.uuid4().hex for _ in range(args.concurrency * workers * 2)]
        await asyncio.gather(*(client.start_run(shape, run_id=r) for r in warm_ids))

        async def warmed() -> bool:
            return int(await pool.fetchval(finished)) >= len(warm_ids)

        await until(warmed)
        cpu_before = cpu_snapshot(pids)
        run_ids = [uuid.uuid4().hex for _ in range(runs)]
        await asyncio.gather(*(client.start_run(shape, run_id=r) for r in run_ids))

        async def all_finished() -> bool:
            return int(await pool.fetchval(finished)) >= runs + len(warm_ids)

        await until(all_finished)
        cpu_after = cpu_snapshot(pids)
        rows = await pool.fetch(
            "SELECT extract(epoch FROM created_at)::float8 AS s, "
            "extract(epoch FROM finished_at)::float8 AS e, result::jsonb->>'status' AS st "
            f"FROM {runs_table} WHERE run_id = ANY($1::text[])",
            run_ids,
        )
        bad = [r["st"] for r in rows if r["st"] != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} runs did not complete: {bad[:3]}")
        # One run at a time: the latency of a run's path, without queueing behind others.
        solo = []
        for _ in range(SOLO_RUNS if not args.no_solo else 0):
            began = time.perf_counter()
            result = await client.wait_for_result(await client.start_run(shape), 60)
            if result.status != "completed":
                raise RuntimeError(f"a solo run ended {result.status}: {result.errors}")
            solo.append((time.perf_counter() - began) * 1000)
    finally:
        await procs.stop()
        await client.broker.delete_topology()
        pool = await client.store.pool()
        names = client.store.names
        await pool.execute(f"DROP TABLE IF EXISTS {names.runs}, {names.versions}, {names.leases}")
        await client.aclose()
    stats = procs.stats()
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    span = max(r["e"] for r in rows) - min(r["s"] for r in rows)
    latencies = sorted((r["e"] - r["s"]) * 1000 for r in rows)
    jobs = total["jobs"]  # every job handled, the solo runs' too
    node_jobs = runs * JOBS_PER_RUN[shape]
    return {
        "jobs_per_s": round(node_jobs / span, 1),
        **cpu_per_job(cpu_before, cpu_after, node_jobs),
        "seconds": round(span, 3),
        "handled_jobs": jobs,
        "handled_jobs_expected": (runs + len(solo) + len(warm_ids)) * JOBS_PER_RUN[shape],
        "solo_latency_ms": round(statistics.median(solo), 1) if solo else None,
        "latency_ms": latency_summary(latencies),
        "round_trips_per_job": {
            "rabbitmq": round(total["rabbitmq"] / jobs, 2),
            "acks": round(total["acks"] / jobs, 2),
            "postgres": round(total["postgres"] / jobs, 2),
            "redis": round(total["redis"] / jobs, 2),
        },
    }


# ---------------------------------------------------------------------- Celery


def celery_app(config: dict[str, Any], *, tasks: bool = False) -> Any:
    """The Celery app of one pass; with ``tasks`` (a worker) it registers ``bench.step``
    (every node; with ``run``, the run's last task: it records the time in Redis) and
    ``bench.join``. The driver sends signatures by name."""
    from celery import Celery

    app = Celery("bench", broker=config["amqp_url"], backend=config["backend"])
    app.conf.update(
        task_default_queue=config["queue"],
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=600,
        worker_hijack_root_logger=False,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
    )
    if not tasks:
        return app
    recorder: list[Any] = []

    def record(run: str) -> None:
        if not recorder:
            import redis

            recorder.append(redis.Redis.from_url(config["redis_url"]))
        recorder[0].rpush(config["done_key"], f"{run} {time.time()}")

    @app.task(name="bench.step")  # type: ignore[untyped-decorator]
    def step(value: Any = None, run: str | None = None) -> Any:
        if run is not None:
            record(run)
        return 1 if value is None else value

    @app.task(name="bench.join")  # type: ignore[untyped-decorator]
    def join(values: list[Any]) -> Any:
        return sum(values)

    return app


class CeleryWorkers:
    """``count`` Celery worker processes (this file with ``--celery-worker``)."""

    def __init__(self, config: dict[str, Any], count: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-celery-"))
        self.count = count
        self.procs = []
        for i in range(count):
            mine = {**config, "index": i, "ready": str(self.tmp / f"ready{i}")}
            env = {**os.environ, "BENCH_CELERY": json.dumps(mine)}
            argv = [sys.executable, __file__, "--celery-worker"]
            # Celery's banner goes nowhere; its warnings and errors to stderr.
            self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))

    def ready(self) -> bool:
        return all((self.tmp / f"ready{i}").exists() for i in range(self.count))

    def stop(self) -> None:
        """Warm shutdown (SIGTERM) of every worker."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def celery_worker_main() -> None:
    """One Celery worker process (prefork, ``-c`` the benchmark's concurrency) until SIGTERM."""
    from celery.signals import worker_ready

    config = json.loads(os.environ["BENCH_CELERY"])
    app = celery_app(config, tasks=True)
    worker_ready.connect(lambda **_: Path(config["ready"]).touch(), weak=False)
    app.worker_main(
        [
            "worker",
            "--loglevel=WARNING",
            "--pool=prefork",
            f"--concurrency={config['concurrency']}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--hostname=bench{config['index']}@%h",
        ]
    )


def celery_signature(app: Any, shape: str, run: str) -> Any:
    from celery import chain, chord

    def step(**kwargs: Any) -> Any:
        return app.signature("bench.step", kwargs=kwargs)

    if shape == "chain":
        return chain(*(step() for _ in range(CHAIN - 1)), step(run=run))
    branches = [step() for _ in range(BRANCHES)]
    return chain(step(), chord(branches, app.signature("bench.join")), step(run=run))


async def measure_celery(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    import redis.asyncio as redis_asyncio

    tag = uuid.uuid4().hex[:10]
    backend = "rpc://" if shape == "chain" and args.celery_results == "rpc" else urls["redis_url"]
    config = {
        "amqp_url": urls["amqp_url"],
        "redis_url": urls["redis_url"],
        "backend": backend,
        "queue": f"bench-celery-{tag}",
        "done_key": f"bench-celery:{tag}:done",
        "concurrency": args.concurrency,
    }
    procs = CeleryWorkers(config, workers)
    pids = [p.pid for p in procs.procs]
    app = celery_app(config)
    redis = redis_asyncio.Redis.from_url(urls["redis_url"], decode_responses=True)
    try:
        await until(procs.ready)
        # Warm up first: Celery's prefork children finish starting on their first tasks
        # (about 3 s of CPU a pass: a cold chain cost 2.9 ms per job over 200 runs, a warm
        # one 1.3), which our workers, connected before the pass, do not pay.
        warm = args.concurrency * workers * 2
        for _ in range(warm):
            await asyncio.to_thread(celery_signature(app, shape, "warm-up").apply_async)

        async def warmed() -> bool:
            return int(await redis.llen(config["done_key"])) >= warm

        await until(warmed)
        await redis.delete(config["done_key"])
        await asyncio.sleep(0.5)
        cpu_before = cpu_snapshot(pids)
        sent: dict[str, float] = {}
        for _ in range(args.runs):
            run = uuid.uuid4().hex
            signature = celery_signature(app, shape, run)
            sent[run] = time.time()
            await asyncio.to_thread(signature.apply_async)

        async def all_done() -> bool:
            return int(await redis.llen(config["done_key"])) >= args.runs

        await until(all_done)
        cpu_after = cpu_snapshot(pids)
        ended = {}
        for item in await redis.lrange(config["done_key"], 0, -1):
            run, at = item.split(" ")
            ended[run] = float(at)
    finally:
        await asyncio.to_thread(procs.stop)
        await redis.delete(config["done_key"])
        await redis.aclose()
        app.close()
        await _delete_queue(urls["amqp_url"], config["queue"])
    span = max(ended.values()) - min(sent.values())
    latencies = sorted((ended[r] - sent[r]) * 1000 for r in ended)
    node_jobs = args.runs * JOBS_PER_RUN[shape]
    return {
        "jobs_per_s": round(node_jobs / span, 1),
        **cpu_per_job(cpu_before, cpu_after, node_jobs),
        "seconds": round(span, 3),
        "results": backend.split(":", 1)[0],
        "latency_ms": latency_summary(latencies),
    }


async def _delete_queue(amqp_url: str, name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(name)
    finally:
        await connection.close()


# ---------------------------------------------------------------------- the passes


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": min(values), "max": max(values)}


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    """``--rounds`` passes of ours (each followed by Celery's with ``--celery``)."""
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        ours.append(await measure_ours(urls, args, shape, workers))
        if args.celery:
            theirs.append(await measure_celery(urls, args, shape, workers))
    row: dict[str, Any] = {
        "shape": shape,
        "workers": workers,
        "runs": args.runs,
        "node_jobs": args.runs * JOBS_PER_RUN[shape],
        "jobs_per_s": _spread([r["jobs_per_s"] for r in ours]),
        "cpu_ms_per_job": _spread([r["cpu_ms_per_job"] for r in ours]),
        "machine_cpu_ms_per_job": _spread([r["machine_cpu_ms_per_job"] for r in ours]),
        "rounds": ours,
    }
    if theirs:
        row["celery"] = {
            "jobs_per_s": _spread([r["jobs_per_s"] for r in theirs]),
            "cpu_ms_per_job": _spread([r["cpu_ms_per_job"] for r in theirs]),
            "machine_cpu_ms_per_job": _spread([r["machine_cpu_ms_per_job"] for r in theirs]),
            "rounds": theirs,
        }
        row["vs_celery"] = {
            "jobs_per_s": _ratios(ours, theirs, "jobs_per_s"),
            "cpu_ms_per_job": _ratios(ours, theirs, "cpu_ms_per_job"),
        }
    return row


def _ratios(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The ratio of the medians, and each round's ratio (ours / Celery's, same round)."""
    each = [round(a[key] / b[key], 2) for a, b in zip(ours, theirs, strict=True)]
    median = statistics.median(r[key] for r in ours) / statistics.median(r[key] for r in theirs)
    return {"median": round(median, 2), "rounds": each}


HEADER = (
    f"{'shape':<8} {'workers':>7} {'jobs/s':>16} {'cpu ms':>14} {'all ms':>6} {'p50 ms':>7} "
    f"{'solo ms':>7} {'rabbit':>6} {'acks':>5} {'pg':>5} {'redis':>5} | "
    f"{'celery jobs/s':>16} {'cpu ms':>14} {'all ms':>6} {'x celery':>16}"
)


def _range(spread: dict[str, float], digits: int) -> str:
    if spread["min"] == spread["max"]:
        return f"{spread['median']:.{digits}f}"
    return f"{spread['median']:.{digits}f} ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"


def row(r: dict[str, Any]) -> str:
    last = r["rounds"][-1]
    rt = last["round_trips_per_job"]
    text = (
        f"{r['shape']:<8} {r['workers']:>7} {_range(r['jobs_per_s'], 0):>16} "
        f"{_range(r['cpu_ms_per_job'], 2):>14} {r['machine_cpu_ms_per_job']['median']:>6.2f} "
        f"{last['latency_ms']['p50']:>7} "
        f"{last['solo_latency_ms'] or '-':>7} "
        f"{rt['rabbitmq']:>6} {rt['acks']:>5} {rt['postgres']:>5} {rt['redis']:>5} | "
    )
    if "celery" in r:
        ratio = r["vs_celery"]["jobs_per_s"]
        rounds = ",".join(f"{x:.2f}" for x in ratio["rounds"])
        text += (
            f"{_range(r['celery']['jobs_per_s'], 0):>16} "
            f"{_range(r['celery']['cpu_ms_per_job'], 2):>14} "
            f"{r['celery']['machine_cpu_ms_per_job']['median']:>6.2f} "
            f"{ratio['median']:>5.2f} ({rounds})"
        )
    return text


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--celery", action="store_true", help="Celery's passes, interleaved")
    parser.add_argument("--celery-results", choices=["rpc", "redis"], default="rpc")
    parser.add_argument("--rounds", type=int, default=1, help="passes per shape and workers")
    parser.add_argument("--no-solo", action="store_true", help="skip the solo-latency runs")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CONCURRENCY,
        help=f"jobs at once per worker process, both sides (default {CONCURRENCY})",
    )
    parser.add_argument("--prefetch", type=int, help="our workers' prefetch (default: concurrency)")
    parser.add_argument(
        "--uvloop", action="store_true", help="our workers on uvloop (uv run --with uvloop)"
    )


if __name__ == "__main__":
    if "--worker" in sys.argv and json.loads(os.environ["BENCH_WORKER"]).get("uvloop"):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    if "--celery-worker" in sys.argv:
        celery_worker_main()
    else:
        main(
            __doc__,
            runs=200,
            worker=worker_main,
            services={"rabbitmq": "amqp_url", "postgres": "postgres_dsn", "redis": "redis_url"},
            measure=measure,
            header=HEADER,
            row=row,
            arguments=arguments,
        )
