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

import os
import uuid
from argparse import Namespace
from collections import Counter
from typing import Any

from _workloads import (
    CONCURRENCY,
    WorkerProcesses,
    count_coordination,
    flows,
    main,
    start_runs,
    summary,
    table,
    total,
    wait_redis_results,
    work,
)

from flowcraft_gcp import GcpAdapter


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


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    adapter = make_adapter(config)
    redis_calls: Counter[str] = Counter()
    count_coordination(adapter, redis_calls)
    return await work(adapter, config, lambda: dict(adapter.clients.requests) | redis_calls)


def requests(calls: Counter[str]) -> dict[str, int]:
    pulls = calls["pubsub.pull"]
    found = {
        "pubsub": total(calls, "pubsub.") - pulls,
        "pull": pulls,
        "firestore": total(calls, "firestore."),
        "redis": total(calls, "redis."),
    }
    return found | {"total": sum(found.values())}


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    base = {**urls, "project": f"bench-{uuid.uuid4().hex[:10]}"}
    client = make_adapter(base)
    await client.queue.ensure()  # before the workers pull
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-gcp-")
    try:
        await procs.ready()
        run_ids, started = await start_runs(client, shape, args.runs)
        finished = await wait_redis_results(
            client.redis, {r: client.results.key(r) for r in run_ids}
        )
    finally:
        await procs.stop()
        await client.aclose()
    return summary(shape, workers, started, finished, procs.stats(), requests)


HEADER, row = table(
    {"pubsub": "pubsub", "pull": "pull", "firestore": "fs", "redis": "redis", "total": "total"}
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
