"""What the adapter benchmarks (``bench_rabbitmq.py``, ``bench_sqs.py``) share: the
workloads, the worker processes and the command line.

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond`` (start,
16 parallel nodes, an ``all`` join, end); nodes are trivial. A bench runs its own file
with ``--worker`` as each worker process (:class:`WorkerProcesses`); the config comes in
the environment variable ``BENCH_WORKER`` and the worker's counts go back in a file.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.distributed.payload import JobPayload

CHAIN = 10
BRANCHES = 16
CONCURRENCY = 8
JOBS_PER_RUN = {"chain": CHAIN, "diamond": BRANCHES + 3}

Config = dict[str, Any]
Result = dict[str, Any]


def flows() -> RuntimeOptions:
    async def step(ctx: NodeContext) -> Any:
        return ctx.input if ctx.input is not None else 1

    chain = Flow("chain")
    names = [f"n{i}" for i in range(CHAIN)]
    for name in names:
        chain.node(name, "step")
    chain.chain(*names)
    diamond = Flow("diamond").node("start", "step").node("join", "step").node("end", "step")
    for i in range(BRANCHES):
        diamond.node(f"b{i}", "step").edge("start", f"b{i}").edge(f"b{i}", "join")
    diamond.edge("join", "end")
    blueprints = {f.id: f.to_blueprint() for f in (chain, diamond)}
    return RuntimeOptions(registry={"step": step}, blueprints=blueprints)


class JobCounter:
    """Counts the jobs ``adapter`` handles."""

    def __init__(self, adapter: BaseDistributedAdapter) -> None:
        self.jobs = 0
        handle = adapter.handle_job

        async def counted(job: JobPayload) -> None:
            self.jobs += 1
            await handle(job)

        adapter.handle_job = counted  # type: ignore[method-assign]


COORDINATION_CALLS = ("increment", "set_if_not_exist", "extend_ttl", "delete", "delete_many", "get")


def count_coordination(adapter: BaseDistributedAdapter, counts: Counter[str]) -> None:
    """Count the coordination store's operations and the result publications (as
    ``redis.<operation>``: the adapters that use it keep both in Redis)."""
    store = adapter.coordination_store
    for name in COORDINATION_CALLS:
        method = getattr(store, name, None)
        if method is None:  # delete_many is optional
            continue

        def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
            counts[f"redis.{_name}"] += 1
            return _method(*args)

        setattr(store, name, counted)
    results = adapter.results
    assert results is not None
    publish = results.publish

    async def published(result: Any) -> None:
        counts["redis.publish_result"] += 1
        await publish(result)

    results.publish = published  # type: ignore[method-assign]


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def work(
    adapter: BaseDistributedAdapter,
    config: Config,
    calls: Callable[[], Mapping[str, int] | Awaitable[Mapping[str, int]]],
) -> Result:
    """A worker process's life: handle jobs until SIGTERM, then report its jobs, its
    CPU time and ``calls()`` (the requests it made, by operation)."""
    counter = JobCounter(adapter)
    cpu = cpu_seconds()
    try:
        await serve(adapter, config)
    finally:
        cpu = cpu_seconds() - cpu
        made = calls()
        if inspect.isawaitable(made):
            made = await made
        stats = {"jobs": counter.jobs, "calls": dict(made), "cpu_s": cpu}
        await adapter.aclose()
    return stats


async def start_runs(
    client: BaseDistributedAdapter, shape: str, runs: int
) -> tuple[list[str], dict[str, float]]:
    """Start ``runs`` runs of ``shape`` at once: their ids and start times."""
    run_ids = [uuid.uuid4().hex for _ in range(runs)]
    started: dict[str, float] = {}

    async def start(run_id: str) -> None:
        started[run_id] = time.time()
        await client.start_run(shape, run_id=run_id)

    await asyncio.gather(*(start(r) for r in run_ids))
    return run_ids, started


async def wait_redis_results(redis: Any, keys: Mapping[str, str]) -> dict[str, float]:
    """Poll the Redis result records (``{run_id: key}``) until every run has one: when
    each was published. Raises if any run did not complete."""
    finished: dict[str, float] = {}
    failed = 0
    runs = list(keys)
    while len(finished) < len(runs):
        await asyncio.sleep(0.1)
        for run_id, raw in zip(runs, await redis.mget([keys[r] for r in runs]), strict=True):
            if raw is not None and run_id not in finished:
                record = json.loads(raw)
                finished[run_id] = float(record["publishedAt"])
                failed += record["status"] != "completed"
    if failed:
        raise RuntimeError(f"{failed} runs did not complete")
    return finished


def total(calls: Mapping[str, int], prefix: str, *, but: Iterable[str] = ()) -> int:
    """Calls whose operation starts with ``prefix``, leaving out ``but``."""
    left_out = set(but)
    return sum(v for k, v in calls.items() if k.startswith(prefix) and k not in left_out)


def summary(
    shape: str,
    workers: int,
    started: Mapping[str, float],
    finished: Mapping[str, float],
    stats: list[Result],
    requests: Callable[[Counter[str]], Mapping[str, int]],
) -> Result:
    """One row of results from the runs' start and publication times and the worker
    processes' reports; ``requests(calls)`` groups the workers' calls into the columns
    reported per node job."""
    jobs = sum(s["jobs"] for s in stats)
    calls: Counter[str] = Counter()
    for s in stats:
        calls.update(s["calls"])
    runs = len(started)
    span = max(finished.values()) - min(started.values())
    latencies = sorted((finished[r] - started[r]) * 1000 for r in started)
    result: Result = {
        "shape": shape,
        "workers": workers,
        "runs": runs,
        "node_jobs": jobs,
        "expected_jobs": runs * JOBS_PER_RUN[shape],
        "seconds": round(span, 3),
        "jobs_per_s": round(jobs / span, 1),
        "runs_per_s": round(runs / span, 2),
        "latency_ms": latency_summary(latencies),
    }
    if all("cpu_s" in s for s in stats):
        cpu = sum(s["cpu_s"] for s in stats)
        result["worker_cpu_ms_per_node_job"] = round(1000 * cpu / jobs, 3)
    result["requests_per_job"] = {k: round(v / jobs, 2) for k, v in requests(calls).items()}
    result["worker_requests_by_operation"] = dict(sorted(calls.items()))
    return result


def table(columns: Mapping[str, str]) -> tuple[str, Callable[[Result], str]]:
    """The header and row printer of a results table: the common columns, then
    ``requests_per_job[key]`` under each ``{key: label}``."""
    head = (
        f"{'shape':<8} {'workers':>7} {'runs':>5} {'jobs':>6} {'jobs/s':>7} {'runs/s':>7} "
        f"{'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'cpu ms':>7}"
    )
    header = head + "".join(f" {label:>{max(len(label), 5)}}" for label in columns.values())

    def row(r: Result) -> str:
        lat, calls = r["latency_ms"], r["requests_per_job"]
        line = (
            f"{r['shape']:<8} {r['workers']:>7} {r['runs']:>5} {r['node_jobs']:>6} "
            f"{r['jobs_per_s']:>7} {r['runs_per_s']:>7} {lat['p50']:>8} {lat['p95']:>8} "
            f"{lat['max']:>8} {r.get('worker_cpu_ms_per_node_job', '-'):>7}"
        )
        return line + "".join(
            f" {calls[key]:>{max(len(label), 5)}}" for key, label in columns.items()
        )

    return header, row


async def serve(adapter: BaseDistributedAdapter, config: Config) -> None:
    """Say the worker is ready, then handle jobs until SIGTERM."""
    await asyncio.to_thread(Path(config["ready"]).touch)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop())
    )
    await adapter.worker()


class WorkerProcesses:
    """``count`` processes running ``script --worker``, each with ``base`` as its config."""

    def __init__(self, script: str, base: Config, count: int, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.count = count
        self.procs = []
        for i in range(count):
            config = {**base, "ready": str(self._ready(i)), "stats": str(self._stats(i))}
            env = {**os.environ, "BENCH_WORKER": json.dumps(config)}
            self.procs.append(subprocess.Popen([sys.executable, script, "--worker"], env=env))

    def _ready(self, i: int) -> Path:
        return self.tmp / f"ready{i}"

    def _stats(self, i: int) -> Path:
        return self.tmp / f"stats{i}"

    async def ready(self) -> None:
        await until(lambda: all(self._ready(i).exists() for i in range(self.count)))

    async def stop(self) -> None:
        """SIGTERM every worker and wait for it."""
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            await asyncio.to_thread(proc.wait, 60)

    def stats(self) -> list[Result]:
        """What each worker's ``worker_main`` returned (after :meth:`stop`)."""
        return [json.loads(self._stats(i).read_text()) for i in range(self.count)]


async def until(check: Callable[[], Any]) -> None:
    """Poll ``check`` (sync or async) until it is true."""
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return
        await asyncio.sleep(0.05)


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50, p95 and max of sorted latencies (ms)."""
    return {
        "p50": round(statistics.median(latencies), 1),
        "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "max": round(latencies[-1], 1),
    }


def backends(services: Mapping[str, str]) -> tuple[dict[str, str], Any]:
    """``{key: url}`` for each ``{service: key}``: ``FLOWCRAFT_TEST_<SERVICE>_URL`` if set,
    else started by ``flowcraft_backends`` (the pool returned: stop it at the end)."""
    urls: dict[str, str] = {}
    pool = None
    for service, key in services.items():
        url = os.environ.get(f"FLOWCRAFT_TEST_{service.upper()}_URL")
        if url is None:
            if pool is None:
                from flowcraft_backends._pool import ServicePool

                pool = ServicePool()
            url = pool.get(service).url
        urls[key] = url
    return urls, pool


Measure = Callable[[dict[str, str], argparse.Namespace, str, int], Awaitable[Result]]
"""``measure(urls, args, shape, workers)``: one row of results."""


def main(
    doc: str | None,
    *,
    runs: int,
    worker: Callable[[Config], Coroutine[Any, Any, Result]],
    services: Mapping[str, str],
    measure: Measure,
    header: str,
    row: Callable[[Result], str],
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    """A bench's command line: with ``--worker``, one worker process (``worker(config)``,
    its result written to the stats file); else ``measure`` for every shape and worker
    count, printed as a table (``header``, ``row``) or as one JSON object (``--json``).
    ``arguments`` adds the bench's own options."""
    if "--worker" in sys.argv:
        config = json.loads(os.environ["BENCH_WORKER"])
        counts = asyncio.run(worker(config))
        Path(config["stats"]).write_text(json.dumps(counts))
        return
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--shapes", default="chain,diamond")
    if arguments is not None:
        arguments(parser)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.json:
        concurrency = getattr(args, "concurrency", CONCURRENCY)
        print(f"{os.cpu_count()} cores; concurrency {concurrency} per worker", flush=True)
        print(header, flush=True)
    found = asyncio.run(_measure_all(args, services, measure, row))
    if args.json:
        print(json.dumps({"cpus": os.cpu_count(), "results": found}, indent=2))


async def _measure_all(
    args: argparse.Namespace,
    services: Mapping[str, str],
    measure: Measure,
    row: Callable[[Result], str],
) -> list[Result]:
    urls, pool = backends(services)
    try:
        results = []
        for shape in args.shapes.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                results.append(await measure(urls, args, shape, workers))
                if not args.json:
                    print(row(results[-1]), flush=True)
        return results
    finally:
        if pool is not None:
            pool.stop_all()
