"""SQS + DynamoDB adapter benchmark: worker processes against moto (or real AWS endpoints).

    uv run python benchmarks/bench_sqs.py                 # table
    uv run python benchmarks/bench_sqs.py --json          # one JSON object
    uv run python benchmarks/bench_sqs.py --runs 20 --workers 2 --shapes diamond --fifo

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started at
once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are trivial, so
the figures are the adapter's and the backend's cost.

Columns: ``jobs/s`` node jobs handled per second and ``runs/s`` runs finished per
second, over the span from the first start to the last published result; ``p50``/
``p95``/``max`` run latency (start to published result, ms); ``cpu ms`` the workers'
CPU (user + system) per node job; ``sqs``, ``ddb``: AWS API
calls per node job made by the workers (botocore's count of requests, retries not
counted twice), with ``recv`` (ReceiveMessage, which depends on idle polling) shown
apart from ``sqs``; ``client``: calls the client made per run (start + waiting).

moto serialises DynamoDB requests (see flowcraft_backends/services/_moto_atomic.py) and
runs on the same two cores, so absolute figures are moto's; the calls per job are the
adapter's and carry over to AWS.

Backend: ``FLOWCRAFT_TEST_MOTO_URL`` if set, else a moto server started here by
``flowcraft_backends`` (and stopped at the end).
"""

from __future__ import annotations

import asyncio
import uuid
from argparse import ArgumentParser, Namespace
from collections import Counter
from typing import Any

from _workloads import (
    CONCURRENCY,
    Result,
    WorkerProcesses,
    flows,
    main,
    start_runs,
    summary,
    table,
    total,
    work,
)

from flowcraft_sqs import AwsClients, AwsSettings, SqsAdapter, create_queues, create_table

STATE_TTL = 24 * 3600.0


def make_adapter(config: dict[str, Any], clients: AwsClients) -> SqsAdapter:
    return SqsAdapter(
        runtime_options=flows(),
        queue_url=config["queue_url"],
        table_name=config["table"],
        clients=clients,
        namespace=config["namespace"],
        concurrency=CONCURRENCY,
        wait_time_seconds=1,
        state_ttl_seconds=STATE_TTL,
    )


def settings(url: str) -> AwsSettings:
    return AwsSettings(
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    clients = AwsClients(settings(config["url"]))
    try:
        return await work(make_adapter(config, clients), config, lambda: dict(clients.api_calls))
    finally:
        clients.close()


def requests(calls: Counter[str]) -> dict[str, int]:
    receives = calls["sqs.ReceiveMessage"]
    found = {
        "sqs": total(calls, "sqs.") - receives,
        "receive": receives,
        "dynamodb": total(calls, "dynamodb."),
    }
    return found | {"total": sum(found.values())}


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    url, runs, fifo = urls["url"], args.runs, args.fifo
    tag = uuid.uuid4().hex[:10]
    clients = AwsClients(settings(url))
    table_name = f"bench-{tag}"
    await create_table(clients, table_name)
    queues = await create_queues(clients, f"bench-{tag}", fifo=fifo)
    base = {"url": url, "queue_url": queues.queue_url, "table": table_name, "namespace": tag}
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-sqs-")
    client = make_adapter(base, clients)
    try:
        await procs.ready()
        clients.reset_api_calls()
        run_ids, started = await start_runs(client, shape, runs)
        finished: dict[str, float] = {}
        while len(finished) < runs:
            await asyncio.sleep(0.1)
            for run_id in [r for r in run_ids if r not in finished]:
                found = await read_published(client, run_id)
                if found is not None:
                    finished[run_id] = found
        client_calls = clients.total_api_calls()
        bad = [r for r in run_ids if (await client.get_final_result(r)).status != "completed"]  # type: ignore[union-attr]
        if bad:
            raise RuntimeError(f"{len(bad)} runs did not complete")
    finally:
        await procs.stop()
        await clients.dynamodb_call("delete_table", TableName=table_name)
        for queue in (queues.queue_url, queues.dead_letter_queue_url):
            await clients.sqs_call("delete_queue", QueueUrl=queue)
        clients.close()
    result = summary(shape, workers, started, finished, procs.stats(), requests)
    return result | {
        "queue": "fifo" if fifo else "standard",
        "client_calls_per_run": round(client_calls / runs, 2),
    }


async def read_published(client: SqsAdapter, run_id: str) -> float | None:
    """When the run's result was published (its item's expiry minus the TTL), or None."""
    response = await client.clients.dynamodb_call(
        "get_item",
        TableName=client.runs.table_name,
        Key=client.runs.result_key(run_id),
        ConsistentRead=True,
    )
    item = response.get("Item")
    if not item or "r" not in item:
        return None
    return int(item["x"]["N"]) / 1000 - STATE_TTL


_HEADER, _row = table({"sqs": "sqs", "receive": "recv", "dynamodb": "ddb", "total": "total"})
HEADER = f"{_HEADER} {'client':>7} {'queue':<8}"


def row(r: Result) -> str:
    return f"{_row(r)} {r['client_calls_per_run']:>7} {r['queue']:<8}"


def fifo_option(parser: ArgumentParser) -> None:
    parser.add_argument("--fifo", action="store_true", help="a FIFO queue (group per run)")


if __name__ == "__main__":
    main(
        __doc__,
        runs=50,
        worker=worker_main,
        services={"moto": "url"},
        measure=measure,
        header=HEADER,
        row=row,
        arguments=fifo_option,
    )
