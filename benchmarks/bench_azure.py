"""Azure adapter benchmark: Storage Queues (Azurite) and Cosmos DB (the test server) +
Redis, worker processes.

    uv run python benchmarks/bench_azure.py                 # table
    uv run python benchmarks/bench_azure.py --json          # one JSON object
    uv run python benchmarks/bench_azure.py --runs 50 --workers 2 --shapes diamond

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started at
once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are trivial, so
the figures are the adapter's and the backends' cost.

Columns: ``jobs/s`` node jobs per second and ``runs/s`` runs finished per second, from
the first start to the last published result; ``p50``/``p95``/``max`` run latency
(start to published result, ms: mostly queueing, as all start at once); ``cpu ms`` the
workers' CPU (user + system) per node job; ``queue``, ``recv``, ``cosmos``, ``redis``:
requests per node job made by the workers (Storage Queue sends, visibility updates and
deletes; receives, which depend on idle polling; Cosmos DB queries, patches, replaces
and creates; Redis coordination and result operations).

Azurite and the Cosmos DB test server are Node processes on the same cores, so absolute
figures are theirs; the requests per job are the adapter's and carry over to Azure.

Backends: ``FLOWCRAFT_TEST_{AZURITE,COSMOS,REDIS}_URL`` if set, else started here by
``flowcraft_backends`` (and stopped at the end).
"""

from __future__ import annotations

import asyncio
import json
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

from flowcraft_azure import AzureAdapter

# Azurite's and the Cosmos DB emulator's documented, public development keys.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
COSMOS_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)
STORE_CALLS = ("increment", "set_if_not_exist", "extend_ttl", "delete", "get")


def make_adapter(config: dict[str, Any]) -> AzureAdapter:
    account = config["azurite"].rstrip("/").rsplit("/", 1)[-1]
    return AzureAdapter(
        runtime_options=flows(),
        storage_connection_string=(
            f"DefaultEndpointsProtocol=http;AccountName={account};AccountKey={AZURITE_KEY};"
            f"QueueEndpoint={config['azurite']};"
        ),
        cosmos_url=config["cosmos"],
        cosmos_credential=COSMOS_KEY,
        cosmos_options={"enable_endpoint_discovery": False},
        require_strong_consistency=False,  # the test server: one process, one copy
        redis_url=config["redis"],
        queue_name=config["tag"],
        database="flowcraft-bench",
        container=config["tag"],
        key_prefix=f"bench:{config['tag']}:",
        concurrency=CONCURRENCY,
        max_poll_interval=0.2,
    )


def redis_meter(adapter: AzureAdapter) -> Counter[str]:
    """Wrap the coordination store's five operations and the result publication."""
    seen: Counter[str] = Counter()
    store = adapter.coordination_store
    for name in STORE_CALLS:
        inner = getattr(store, name)

        async def call(*args: Any, _inner: Any = inner, _name: str = name) -> Any:
            seen[_name] += 1
            return await _inner(*args)

        setattr(store, name, call)
    results = adapter.results
    assert results is not None
    announce = results.publish

    async def publish(result: Any) -> None:
        seen["publish_result"] += 1
        await announce(result)

    results.publish = publish  # type: ignore[method-assign]
    return seen


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    adapter = make_adapter(config)
    counter = JobCounter(adapter)
    redis_calls = redis_meter(adapter)
    cpu = cpu_seconds()
    try:
        await serve(adapter, config)
    finally:
        cpu = cpu_seconds() - cpu
        calls = {f"queue.{k}": v for k, v in adapter.queue.requests.items()}
        calls |= {f"cosmos.{k}": v for k, v in adapter.runs.requests.items()}
        calls |= {f"redis.{k}": v for k, v in redis_calls.items()}
        stats = {"jobs": counter.jobs, "calls": calls, "cpu_s": cpu}
        await adapter.aclose()
    return stats


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    runs = args.runs
    base = {**urls, "tag": f"bench-{uuid.uuid4().hex[:10]}"}
    client = make_adapter(base)
    await client.create_resources()  # before the workers poll
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-azure-")
    try:
        await procs.ready()
        run_ids = [uuid.uuid4().hex for _ in range(runs)]
        started: dict[str, float] = {}

        async def start(run_id: str) -> None:
            started[run_id] = time.time()
            await client.start_run(shape, run_id=run_id)

        await asyncio.gather(*(start(r) for r in run_ids))
        assert client.results is not None
        keys = [client.results.key(r) for r in run_ids]
        redis = client.results._client
        finished: dict[str, float] = {}
        failed = 0
        while len(finished) < runs:
            await asyncio.sleep(0.1)
            for run_id, raw in zip(run_ids, await redis.mget(keys), strict=True):
                if raw is not None and run_id not in finished:
                    record = json.loads(raw)
                    finished[run_id] = float(record["publishedAt"])
                    failed += record["status"] != "completed"
        if failed:
            raise RuntimeError(f"{failed} runs did not complete")
    finally:
        await procs.stop()
        await client.queue.delete()
        db = client.cosmos.get_database_client("flowcraft-bench")
        await db.delete_container(base["tag"])
        await client.aclose()
    stats = procs.stats()
    jobs = sum(s["jobs"] for s in stats)
    calls: Counter[str] = Counter()
    for s in stats:
        calls.update(s["calls"])
    span = max(finished.values()) - min(started.values())
    latencies = sorted((finished[r] - started[r]) * 1000 for r in run_ids)
    receives = calls.get("queue.receive", 0)
    queue = sum(v for k, v in calls.items() if k.startswith("queue.")) - receives
    cosmos = sum(v for k, v in calls.items() if k.startswith("cosmos."))
    redis_ops = sum(v for k, v in calls.items() if k.startswith("redis."))
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
            "queue": round(queue / jobs, 2),
            "receive": round(receives / jobs, 2),
            "cosmos": round(cosmos / jobs, 2),
            "redis": round(redis_ops / jobs, 2),
            "total": round((queue + receives + cosmos + redis_ops) / jobs, 2),
        },
        "worker_requests_by_operation": dict(sorted(calls.items())),
    }


HEADER = (
    f"{'shape':<8} {'workers':>7} {'runs':>5} {'jobs':>6} {'jobs/s':>7} {'runs/s':>7} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'cpu ms':>7} {'queue':>6} {'recv':>5} "
    f"{'cosmos':>6} {'redis':>5} {'total':>6}"
)


def row(r: dict[str, Any]) -> str:
    lat, calls = r["latency_ms"], r["requests_per_job"]
    return (
        f"{r['shape']:<8} {r['workers']:>7} {r['runs']:>5} {r['node_jobs']:>6} "
        f"{r['jobs_per_s']:>7} {r['runs_per_s']:>7} {lat['p50']:>8} {lat['p95']:>8} "
        f"{lat['max']:>8} {r['worker_cpu_ms_per_node_job']:>7} {calls['queue']:>6} "
        f"{calls['receive']:>5} {calls['cosmos']:>6} {calls['redis']:>5} {calls['total']:>6}"
    )


if __name__ == "__main__":
    main(
        __doc__,
        runs=200,
        worker=worker_main,
        services={"azurite": "azurite", "cosmos": "cosmos", "redis": "redis"},
        measure=measure,
        header=HEADER,
        row=row,
    )
