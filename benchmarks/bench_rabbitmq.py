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

import asyncio
import statistics
import time
import uuid
from argparse import Namespace
from collections import Counter
from typing import Any

from _workloads import (
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
    counter = JobCounter(adapter)
    await adapter.connect()
    try:
        await serve(adapter, config)
    finally:
        await adapter.aclose()
        await store.inner.aclose()
    return {
        "jobs": counter.jobs,
        "rabbitmq": adapter.broker.round_trips["publish"] + adapter.broker.round_trips["declare"],
        "acks": adapter.broker.round_trips["ack"],
        "postgres": sum(adapter.store.round_trips.values()),
        "redis": sum(store.ops.values()),
    }


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    runs = args.runs
    tag = uuid.uuid4().hex[:10]
    base = {
        **urls,
        "queue": f"bench-{tag}",
        "table": f"bench_{tag}",
        "prefix": f"bench:{tag}:",
    }
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-rabbitmq-")
    client = RabbitMQAdapter(
        runtime_options=flows(), redis_url=urls["redis_url"], **adapter_options(base)
    )
    try:
        await procs.ready()
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
            "extract(epoch FROM finished_at)::float8 AS e, result::jsonb->>'status' AS st "
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
        await procs.stop()
        await client.broker.delete_topology()
        pool = await client.store.pool()
        await pool.execute(
            f"DROP TABLE IF EXISTS {client.store.names.runs}, {client.store.names.versions}"
        )
        await client.aclose()
    stats = procs.stats()
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
        "latency_ms": latency_summary(latencies),
        "round_trips_per_job": {
            "rabbitmq": round(total["rabbitmq"] / jobs, 2),
            "acks": round(total["acks"] / jobs, 2),
            "postgres": round(total["postgres"] / jobs, 2),
            "redis": round(total["redis"] / jobs, 2),
        },
    }


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
    main(
        __doc__,
        runs=200,
        worker=worker_main,
        services={"rabbitmq": "amqp_url", "postgres": "postgres_dsn", "redis": "redis_url"},
        measure=measure,
        header=HEADER,
        row=row,
    )
