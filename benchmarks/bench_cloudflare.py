"""Cloudflare adapter benchmark: worker processes against the companion Worker on Miniflare.

    uv run python benchmarks/bench_cloudflare.py                 # table
    uv run python benchmarks/bench_cloudflare.py --json          # one JSON object
    uv run python benchmarks/bench_cloudflare.py --runs 50 --workers 2 --shapes diamond --direct

Workloads (the BullMQ adapter's): ``chain`` (10 nodes in a row) and ``diamond``
(start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs of each started at
once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes are trivial, so
the figures are the adapter's, the Worker's and Miniflare's cost.

Columns: ``jobs/s`` node jobs per second and ``runs/s`` runs per second, from the first
start to the last published result; ``p50``/``p95``/``max`` run latency (start to the
result's publication, seen by a long poll per run, ms); ``cpu ms`` the workers' CPU
(user + system) per node job; then HTTP calls to the Worker per node job made by the
workers, split by what they reach: ``run`` (a run's Durable Object: context,
coordination, result), ``inbox`` (the inbox object: pull, ack, extend, release),
``queue`` (sends: the Cloudflare Queue, or the inbox with ``--direct``), and ``total``;
``client`` calls the client made per run (start only; the waits are the bench's).

Miniflare runs workerd on the same two cores as the workers, so absolute figures are
Miniflare's; the calls per job are the adapter's and carry over to Cloudflare, where
each call also costs a round trip to the nearest Cloudflare location.

Backend: ``FLOWCRAFT_TEST_MINIFLARE_URL`` if set, else Miniflare started here by
``flowcraft_backends`` (and stopped at the end).
"""

from __future__ import annotations

import asyncio
import json
import time
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
    summary,
    table,
    total,
    work,
)

from flowcraft_cloudflare import (
    CloudflareAdapter,
    WorkerClient,
    WorkerError,
    WorkerSettings,
    worker_dir,
)
from flowcraft_cloudflare.context import run_object


def secret() -> str:
    config = json.loads((worker_dir() / "miniflare.json").read_text())
    value: str = config["bindings"]["FLOWCRAFT_SECRET"]
    return value


def make_adapter(config: dict[str, Any], client: WorkerClient) -> CloudflareAdapter:
    return CloudflareAdapter(
        runtime_options=flows(),
        client=client,
        namespace=config["namespace"],
        queue_name=f"{config['namespace']}-jobs",
        direct=config["direct"],
        concurrency=CONCURRENCY,
        poll_seconds=1.0,
    )


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    client = WorkerClient(WorkerSettings(url=config["url"], secret=secret()))
    try:
        return await work(make_adapter(config, client), config, lambda: dict(client.requests))
    finally:
        await client.aclose()


def requests(calls: Counter[str]) -> dict[str, int]:
    # Write-behind follow-up marks go to run objects too (in calls of their own when
    # they do not ride along with an ack or an admission); the registry is the reconciler's.
    found = {
        "run": calls["do"] + calls["marks"] + calls["registry"],
        "inbox": total(calls, "inbox:"),
        "queue": calls["enqueue"],
    }
    return found | {"total": sum(found.values())}


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    url, runs = urls["url"], args.runs
    base = {"url": url, "namespace": f"bench-{uuid.uuid4().hex[:10]}", "direct": args.direct}
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-cf-")
    client = WorkerClient(WorkerSettings(url=url, secret=secret()))
    waits = WorkerClient(WorkerSettings(url=url, secret=secret(), max_connections=runs + 4))
    adapter = make_adapter(base, client)
    try:
        await procs.ready()
        run_ids = [uuid.uuid4().hex for _ in range(runs)]
        started: dict[str, float] = {}
        finished: dict[str, float] = {}  # seen by a long poll per run, started first

        async def watch(run_id: str) -> None:
            name = run_object(base["namespace"], run_id)
            while True:
                try:
                    answer = await waits.call("wait", {"object": name, "timeout": 20})
                except WorkerError:  # a slow answer on a loaded machine: ask again
                    continue
                if answer.get("value") is not None:
                    finished[run_id] = time.time()
                    return

        watchers = [asyncio.ensure_future(watch(r)) for r in run_ids]

        async def start(run_id: str) -> None:
            started[run_id] = time.time()
            await adapter.start_run(shape, run_id=run_id)

        await asyncio.gather(*(start(r) for r in run_ids))
        client_calls = sum(client.requests.values())
        await asyncio.gather(*watchers)
        results = await asyncio.gather(*(adapter.get_final_result(r) for r in run_ids))
        bad = [r for r in results if r is None or r.status != "completed"]
        if bad:
            raise RuntimeError(f"{len(bad)} runs did not complete")
    finally:
        await procs.stop()
        await adapter.aclose()
        await client.aclose()
        await waits.aclose()
    result = summary(shape, workers, started, finished, procs.stats(), requests)
    return result | {
        "delivery": "direct" if args.direct else "queue",
        "client_calls_per_run": round(client_calls / runs, 2),
    }


_HEADER, _row = table({"run": "run", "inbox": "inbox", "queue": "queue", "total": "total"})
HEADER = f"{_HEADER} {'client':>7} {'send':<7}"


def row(r: Result) -> str:
    return f"{_row(r)} {r['client_calls_per_run']:>7} {r['delivery']:<7}"


def direct_option(parser: ArgumentParser) -> None:
    parser.add_argument(
        "--direct", action="store_true", help="send jobs into the inbox, not through the queue"
    )


if __name__ == "__main__":
    main(
        __doc__,
        runs=200,
        worker=worker_main,
        services={"miniflare": "url"},
        measure=measure,
        header=HEADER,
        row=row,
        arguments=direct_option,
    )
