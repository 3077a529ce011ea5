"""RabbitMQ adapter benchmark: real RabbitMQ, PostgreSQL and Redis, worker processes.

    uv run python benchmarks/bench_rabbitmq.py                 # table
    uv run python benchmarks/bench_rabbitmq.py --json          # one JSON object
    uv run python benchmarks/bench_rabbitmq.py --runs 50 --workers 2 --shapes diamond

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started
at once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are
trivial, so the figures are the adapter's and the servers' cost.

Columns: ``jobs/s`` node jobs handled per second and ``runs/s`` runs finished per
second, both over the span from the first run's start to the last run's end (PostgreSQL
timestamps); ``p50``/``p95``/``max`` run latency of those runs (start to final
result, ms: mostly queueing, as all start at once); ``solo ms`` the median latency
of 20 more runs started one at a time (start_run to wait_for_result returning);
``rabbit``, ``pg``, ``redis``: round trips per node job handled, counted in the workers
(RabbitMQ: confirmed publishes and declarations; acks are one-way frames and are
shown apart as ``acks``; PostgreSQL: statements; Redis: coordination operations).

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
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed import RedisCoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft_rabbitmq import RabbitMQAdapter

CHAIN = 10
BRANCHES = 16
CONCURRENCY = 8
SOLO_RUNS = 20


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


JOBS_PER_RUN = {"chain": CHAIN, "diamond": BRANCHES + 3}


class CountingStore:
    """A coordination store that counts its operations (each is one Redis round trip)."""

    def __init__(self, inner: RedisCoordinationStore) -> None:
        self.inner = inner
        self.ops: Counter[str] = Counter()

    async def increment(self, key: str, ttl_seconds: float) -> int:
        self.ops["increment"] += 1
        return await self.inner.increment(key, ttl_seconds)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        self.ops["set_if_not_exist"] += 1
        return await self.inner.set_if_not_exist(key, value, ttl_seconds)

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        self.ops["extend_ttl"] += 1
        return await self.inner.extend_ttl(key, ttl_seconds)

    async def delete(self, key: str) -> None:
        self.ops["delete"] += 1
        await self.inner.delete(key)

    async def get(self, key: str) -> str | None:
        self.ops["get"] += 1
        return await self.inner.get(key)


def adapter_options(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "amqp_url": config["amqp_url"],
        "postgres_dsn": config["postgres_dsn"],
        "queue_name": config["queue"],
        "table": config["table"],
        "key_prefix": config["prefix"],
        "concurrency": CONCURRENCY,
    }


async def worker_main(config: dict[str, Any]) -> dict[str, int]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    store = CountingStore(RedisCoordinationStore(url=config["redis_url"], key_prefix=""))
    adapter = RabbitMQAdapter(
        runtime_options=flows(), coordination_store=store, **adapter_options(config)
    )
    jobs = 0
    handle = adapter.handle_job

    async def counted(job: JobPayload) -> None:
        nonlocal jobs
        jobs += 1
        await handle(job)

    adapter.handle_job = counted  # type: ignore[method-assign]
    await adapter.connect()
    await asyncio.to_thread(Path(config["ready"]).touch)
    asyncio.get_running_loop().add_signal_handler(
        signal.SIGTERM, lambda: asyncio.ensure_future(adapter.stop())
    )
    try:
        await adapter.worker()
    finally:
        await adapter.aclose()
        await store.inner.aclose()
    return {
        "jobs": jobs,
        "rabbitmq": adapter.broker.round_trips["publish"] + adapter.broker.round_trips["declare"],
        "acks": adapter.broker.round_trips["ack"],
        "postgres": sum(adapter.store.round_trips.values()),
        "redis": sum(store.ops.values()),
    }


async def measure(urls: dict[str, str], shape: str, runs: int, workers: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:10]
    tmp = Path(tempfile.mkdtemp(prefix="bench-rabbitmq-"))
    base = {
        **urls,
        "queue": f"bench-{tag}",
        "table": f"bench_{tag}",
        "prefix": f"bench:{tag}:",
    }
    procs = []
    for i in range(workers):
        config = {**base, "ready": str(tmp / f"ready{i}"), "stats": str(tmp / f"stats{i}")}
        env = {**os.environ, "BENCH_WORKER": json.dumps(config)}
        procs.append(
            await asyncio.create_subprocess_exec(sys.executable, __file__, "--worker", env=env)
        )
    client = RabbitMQAdapter(
        runtime_options=flows(), redis_url=urls["redis_url"], **adapter_options(base)
    )
    try:
        await until(lambda: all((tmp / f"ready{i}").exists() for i in range(workers)))
        await client.connect()
        run_ids = [uuid.uuid4().hex for _ in range(runs)]
        await asyncio.gather(*(client.start_run(shape, run_id=r) for r in run_ids))
        pool = await client.store.pool()
        runs_table = client.store.names.runs
        finished = f"SELECT count(*) FROM {runs_table} WHERE result IS NOT NULL"

        async def all_finished() -> bool:
            return int(await pool.fetchval(finished)) >= runs

        await until(all_finished)
        rows = await pool.fetch(
            "SELECT extract(epoch FROM created_at)::float8 AS s, "
            "extract(epoch FROM finished_at)::float8 AS e, result->>'status' AS st "
            f"FROM {runs_table}"
        )
        bad = [r["st"] for r in rows if r["st"] != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} runs did not complete: {bad[:3]}")
        # One run at a time: the latency of a run's path, without queueing behind others.
        solo = []
        for _ in range(SOLO_RUNS):
            began = time.perf_counter()
            result = await client.wait_for_result(await client.start_run(shape), 60)
            if result.status != "completed":
                raise RuntimeError(f"a solo run ended {result.status}: {result.errors}")
            solo.append((time.perf_counter() - began) * 1000)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 60)
        await client.broker.delete_topology()
        pool = await client.store.pool()
        await pool.execute(
            f"DROP TABLE IF EXISTS {client.store.names.runs}, {client.store.names.versions}"
        )
        await client.aclose()
    stats = [
        json.loads(await asyncio.to_thread((tmp / f"stats{i}").read_text)) for i in range(workers)
    ]
    total = {k: sum(s[k] for s in stats) for k in stats[0]}
    span = max(r["e"] for r in rows) - min(r["s"] for r in rows)
    latencies = sorted((r["e"] - r["s"]) * 1000 for r in rows)
    jobs = total["jobs"]  # every job handled, the solo runs' too
    return {
        "shape": shape,
        "workers": workers,
        "runs": runs,
        "node_jobs": runs * JOBS_PER_RUN[shape],
        "handled_jobs": jobs,
        "handled_jobs_expected": (runs + SOLO_RUNS) * JOBS_PER_RUN[shape],
        "seconds": round(span, 3),
        "jobs_per_s": round(runs * JOBS_PER_RUN[shape] / span, 1),
        "runs_per_s": round(runs / span, 1),
        "solo_latency_ms": {
            "p50": round(statistics.median(solo), 1),
            "max": round(max(solo), 1),
        },
        "latency_ms": {
            "p50": round(statistics.median(latencies), 1),
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
            "max": round(latencies[-1], 1),
        },
        "round_trips_per_job": {
            "rabbitmq": round(total["rabbitmq"] / jobs, 2),
            "acks": round(total["acks"] / jobs, 2),
            "postgres": round(total["postgres"] / jobs, 2),
            "redis": round(total["redis"] / jobs, 2),
        },
    }


async def until(check: Any) -> None:
    """Poll ``check`` (sync or async) until it is true."""
    while True:
        found = check()
        if asyncio.iscoroutine(found):
            found = await found
        if found:
            return
        await asyncio.sleep(0.05)


def backends() -> tuple[dict[str, str], Any]:
    names = {"rabbitmq": "amqp_url", "postgres": "postgres_dsn", "redis": "redis_url"}
    urls: dict[str, str] = {}
    pool = None
    for service, key in names.items():
        url = os.environ.get(f"FLOWCRAFT_TEST_{service.upper()}_URL")
        if url is None:
            if pool is None:
                from flowcraft_backends._pool import ServicePool

                pool = ServicePool()
            url = pool.get(service).url
        urls[key] = url
    return urls, pool


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    urls, pool = backends()
    try:
        results = []
        for shape in args.shapes.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                results.append(await measure(urls, shape, args.runs, workers))
                if not args.json:
                    print(row(results[-1]), flush=True)
        return results
    finally:
        if pool is not None:
            pool.stop_all()


HEADER = (
    f"{'shape':<8} {'workers':>7} {'runs':>5} {'jobs':>6} {'jobs/s':>8} {'runs/s':>7} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'solo ms':>8} "
    f"{'rabbit':>7} {'acks':>5} {'pg':>5} {'redis':>6}"
)


def row(r: dict[str, Any]) -> str:
    lat, rt = r["latency_ms"], r["round_trips_per_job"]
    return (
        f"{r['shape']:<8} {r['workers']:>7} {r['runs']:>5} {r['node_jobs']:>6} "
        f"{r['jobs_per_s']:>8} {r['runs_per_s']:>7} {lat['p50']:>8} {lat['p95']:>8} "
        f"{lat['max']:>8} {r['solo_latency_ms']['p50']:>8} "
        f"{rt['rabbitmq']:>7} {rt['acks']:>5} {rt['postgres']:>5} {rt['redis']:>6}"
    )


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker_config = json.loads(os.environ["BENCH_WORKER"])
        counts = asyncio.run(worker_main(worker_config))
        Path(worker_config["stats"]).write_text(json.dumps(counts))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--shapes", default="chain,diamond")
    parser.add_argument("--json", action="store_true")
    arguments = parser.parse_args()
    if not arguments.json:
        print(f"{os.cpu_count()} cores; concurrency {CONCURRENCY} per worker", flush=True)
        print(HEADER, flush=True)
    found = asyncio.run(main(arguments))
    if arguments.json:
        print(json.dumps({"cpus": os.cpu_count(), "results": found}, indent=2))
