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

from flowcraft_azure import AzureAdapter

# Azurite's and the Cosmos DB emulator's documented, public development keys.
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
COSMOS_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)


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


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    adapter = make_adapter(config)
    redis_calls: Counter[str] = Counter()
    count_coordination(adapter, redis_calls)

    def calls() -> dict[str, int]:
        made = {f"queue.{k}": v for k, v in adapter.queue.requests.items()}
        made |= {f"cosmos.{k}": v for k, v in adapter.runs.requests.items()}
        return made | redis_calls

    return await work(adapter, config, calls)


def requests(calls: Counter[str]) -> dict[str, int]:
    receives = calls["queue.receive"]
    found = {
        "queue": total(calls, "queue.") - receives,
        "receive": receives,
        "cosmos": total(calls, "cosmos."),
        "redis": total(calls, "redis."),
    }
    return found | {"total": sum(found.values())}


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    base = {**urls, "tag": f"bench-{uuid.uuid4().hex[:10]}"}
    client = make_adapter(base)
    await client.create_resources()  # before the workers poll
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-azure-")
    try:
        await procs.ready()
        run_ids, started = await start_runs(client, shape, args.runs)
        assert client.results is not None
        finished = await wait_redis_results(
            client.results._client, {r: client.results.key(r) for r in run_ids}
        )
    finally:
        await procs.stop()
        await client.queue.delete()
        db = client.cosmos.get_database_client("flowcraft-bench")
        await db.delete_container(base["tag"])
        await client.aclose()
    return summary(shape, workers, started, finished, procs.stats(), requests)


HEADER, row = table(
    {"queue": "queue", "receive": "recv", "cosmos": "cosmos", "redis": "redis", "total": "total"}
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
