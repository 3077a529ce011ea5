"""Google Cloud adapter benchmark: Pub/Sub and Firestore (Google's emulators) + Redis,
worker processes.

    uv run python benchmarks/bench_gcp.py                 # table
    uv run python benchmarks/bench_gcp.py --json          # one JSON object
    uv run python benchmarks/bench_gcp.py --runs 50 --workers 2 --shapes diamond

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started at
once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are trivial, so
the figures are the adapter's and the backends' cost.

Columns: ``jobs/s`` node jobs handled per second and ``runs/s`` runs finished per
second, over the span from the first start to the last published result; ``p50``/
``p95``/``max`` run latency (start to published result, ms: mostly queueing, as all
start at once); ``cpu ms`` the workers' CPU (user + system) per node job; ``pubsub``,
``pull``, ``fs``, ``redis``: requests per node job made by the workers (Pub/Sub without
pulls, which depend on idle polling; Firestore reads and commits; Redis coordination
and result operations).

The emulators are Java processes on the same cores, so absolute figures are the
emulators'; the requests per job are the adapter's and carry over to Google Cloud.

Backends: ``FLOWCRAFT_TEST_{PUBSUB,FIRESTORE,REDIS}_URL`` if set, else started here by
``flowcraft_backends`` (and stopped at the end).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
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
)

from flowcraft_gcp import GcpAdapter

_COORDINATION = ("increment", "set_if_not_exist", "extend_ttl", "delete", "get")


def make_adapter(config: dict[str, Any]) -> GcpAdapter:
    os.environ["PUBSUB_EMULATOR_HOST"] = config["pubsub"]
    os.environ["FIRESTORE_EMULATOR_HOST"] = config["firestore"]
    return GcpAdapter(
        runtime_options=flows(),
        project=config["project"],
        redis_url=config["redis"],
        key_prefix=f"bench:{config['project']}:",
        concurrency=CONCURRENCY,
        pull_timeout_seconds=1.0,
    )


def count_redis(adapter: GcpAdapter, counts: Counter[str]) -> None:
    """Count the coordination store's operations and result publications."""
    store = adapter.coordination_store
    for name in _COORDINATION:
        method = getattr(store, name)

        def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
            counts[f"redis.{_name}"] += 1
            return _method(*args)

        setattr(store, name, counted)
    publish = adapter.results.publish

    async def published(result: Any) -> None:
        counts["redis.publish_result"] += 1
        await publish(result)

    adapter.results.publish = published  # type: ignore[method-assign]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    adapter = make_adapter(config)
    counter = JobCounter(adapter)
    redis_calls: Counter[str] = Counter()
    count_redis(adapter, redis_calls)
    cpu = cpu_seconds()
    try:
        await serve(adapter, config)
    finally:
        cpu = cpu_seconds() - cpu
        calls = dict(adapter.clients.requests) | dict(redis_calls)
        stats = {"jobs": counter.jobs, "calls": calls, "cpu_s": cpu}
        await adapter.aclose()
    return stats


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    runs = args.runs
    base = {**urls, "project": f"bench-{uuid.uuid4().hex[:10]}"}
    client = make_adapter(base)
    await client.queue.ensure()  # before the workers pull
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-gcp-")
    try:
        await procs.ready()
        run_ids = [uuid.uuid4().hex for _ in range(runs)]
        started: dict[str, float] = {}

        async def start(run_id: str) -> None:
            started[run_id] = time.time()
            await client.start_run(shape, run_id=run_id)

        await asyncio.gather(*(start(r) for r in run_ids))
        keys = [client.results.key(r) for r in run_ids]
        finished: dict[str, float] = {}
        bad = 0
        while len(finished) < runs:
            await asyncio.sleep(0.1)
            for run_id, raw in zip(run_ids, await client.redis.mget(keys), strict=True):
                if raw is not None and run_id not in finished:
                    record = json.loads(raw)
                    finished[run_id] = float(record["publishedAt"])
                    bad += record["status"] != "completed"
        if bad:
            raise RuntimeError(f"{bad} runs did not complete")
    finally:
        await procs.stop()
        await client.aclose()
    stats = procs.stats()
    jobs = sum(s["jobs"] for s in stats)
    calls: Counter[str] = Counter()
    for s in stats:
        calls.update(s["calls"])
    span = max(finished.values()) - min(started.values())
    latencies = sorted((finished[r] - started[r]) * 1000 for r in run_ids)
    pulls = calls.get("pubsub.pull", 0)
    pubsub = sum(v for k, v in calls.items() if k.startswith("pubsub.")) - pulls
    firestore = sum(v for k, v in calls.items() if k.startswith("firestore."))
    redis = sum(v for k, v in calls.items() if k.startswith("redis."))
    return {
        "shape": shape,
        "workers": workers,
        "runs": runs,
        "node_jobs": jobs,
        "expected_jobs": runs * JOBS_PER_RUN[shape],
        "seconds": round(span, 3),
        "jobs_per_s": round(jobs / span, 1),
        "runs_per_s": round(runs / span, 2),
        "latency_ms": latency_summary(latencies),
        "worker_cpu_ms_per_node_job": round(1000 * sum(s["cpu_s"] for s in stats) / jobs, 3),
        "requests_per_job": {
            "pubsub": round(pubsub / jobs, 2),
            "pull": round(pulls / jobs, 2),
            "firestore": round(firestore / jobs, 2),
            "redis": round(redis / jobs, 2),
            "total": round((pubsub + pulls + firestore + redis) / jobs, 2),
        },
        "worker_requests_by_operation": dict(sorted(calls.items())),
    }


HEADER = (
    f"{'shape':<8} {'workers':>7} {'runs':>5} {'jobs':>6} {'jobs/s':>7} {'runs/s':>7} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'cpu ms':>7} {'pubsub':>6} {'pull':>5} "
    f"{'fs':>5} {'redis':>5} {'total':>6}"
)


def row(r: dict[str, Any]) -> str:
    lat, calls = r["latency_ms"], r["requests_per_job"]
    return (
        f"{r['shape']:<8} {r['workers']:>7} {r['runs']:>5} {r['node_jobs']:>6} "
        f"{r['jobs_per_s']:>7} {r['runs_per_s']:>7} {lat['p50']:>8} {lat['p95']:>8} "
        f"{lat['max']:>8} {r['worker_cpu_ms_per_node_job']:>7} {calls['pubsub']:>6} "
        f"{calls['pull']:>5} {calls['firestore']:>5} {calls['redis']:>5} {calls['total']:>6}"
    )


if __name__ == "__main__":
    main(
        __doc__,
        runs=200,
        worker=worker_main,
        services={"pubsub": "pubsub", "firestore": "firestore", "redis": "redis"},
        measure=measure,
        header=HEADER,
        row=row,
    )
