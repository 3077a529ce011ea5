"""Kafka adapter benchmark: Kafka (jobs), Cassandra (run state) and Redis (coordination,
results), worker processes.

    uv run python benchmarks/bench_kafka.py                 # table
    uv run python benchmarks/bench_kafka.py --json          # one JSON object
    uv run python benchmarks/bench_kafka.py --runs 50 --workers 2 --shapes diamond

Workloads (the BullMQ adapter's, from ``_workloads.py``): ``chain`` (10 nodes in a
row) and ``diamond`` (start, 16 parallel nodes, an ``all`` join, end), ``--runs`` runs
of each started at once, with 1 and 2 worker processes (``concurrency`` 8 each). Nodes
are trivial, so the figures are the adapter's and the backends' cost.

Columns: ``jobs/s`` node jobs handled per second and ``runs/s`` runs finished per second
(first start to last published result); ``p50``/``p95``/``max`` run latency (start to
published result, ms; mostly queueing, as all runs start at once); ``cpu ms`` the
workers' CPU (user + system) per node job; then requests per node job made by the
workers: ``cql`` Cassandra requests, ``redis`` Redis round trips (a pipeline is one),
``produce`` Kafka produce requests (librdkafka batches messages: ``msgs`` is the
messages produced per job), ``kafka`` every Kafka request of the workers (produce,
fetch, commits, heartbeats: fetches depend on idle polling, like SQS's receives).

Backends: ``FLOWCRAFT_TEST_{KAFKA,CASSANDRA,REDIS}_URL`` if set, else started here by
``flowcraft_backends`` (and stopped at the end). Cassandra and Kafka are JVMs on the
same cores as the workers: absolute figures are this machine's; requests per job are
the adapter's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from argparse import Namespace
from collections import Counter
from typing import Any

from _workloads import (
    CONCURRENCY,
    WorkerProcesses,
    flows,
    main,
    start_runs,
    summary,
    table,
    total,
    wait_redis_results,
    work,
)
from redis.asyncio.client import Pipeline, Redis

from flowcraft_kafka import (
    CassandraClient,
    CassandraSettings,
    KafkaAdapter,
    KafkaSettings,
    create_schema,
    create_topics,
)

PARTITIONS = 8


class KafkaStats:
    """librdkafka's statistics (every 500 ms): the latest per client, summed at the end."""

    def __init__(self) -> None:
        self.latest: dict[str, dict[str, int]] = {}

    def callback(self, name: str) -> Any:
        def on_stats(text: str) -> None:
            data = json.loads(text)
            requests: Counter[str] = Counter()
            for broker in data.get("brokers", {}).values():
                requests.update({k: int(v) for k, v in (broker.get("req") or {}).items()})
            requests["messages"] = int(data.get("txmsgs", 0))
            self.latest[name] = dict(requests)

        return on_stats

    def totals(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for counts in self.latest.values():
            total.update(counts)
        return total


def count_redis(calls: Counter[str]) -> None:
    """Count Redis round trips in this process (a pipeline is one)."""
    command = Redis.execute_command
    execute = Pipeline.execute

    async def counted_command(self: Redis, *args: Any, **options: Any) -> Any:
        calls["redis"] += 1
        return await command(self, *args, **options)

    async def counted_execute(self: Pipeline, *args: Any, **options: Any) -> Any:
        calls["redis"] += 1
        return await execute(self, *args, **options)

    Redis.execute_command = counted_command  # type: ignore[method-assign]
    Pipeline.execute = counted_execute  # type: ignore[method-assign]


def settings(config: dict[str, Any], stats: KafkaStats | None = None) -> KafkaSettings:
    extra: dict[str, Any] = {}
    if stats is not None:
        extra = {"statistics.interval.ms": 500}
    return KafkaSettings(
        bootstrap_servers=config["kafka"],
        topic=config["topic"],
        group_id=config["topic"],
        producer_config=extra | ({"stats_cb": stats.callback("producer")} if stats else {}),
        consumer_config=extra | ({"stats_cb": stats.callback("consumer")} if stats else {}),
    )


def cassandra(config: dict[str, Any]) -> CassandraSettings:
    return CassandraSettings.from_address(
        config["cassandra"],
        keyspace=config["keyspace"],
        consistency="ONE",
        serial_consistency="SERIAL",
    )


def make_adapter(config: dict[str, Any], stats: KafkaStats | None = None) -> KafkaAdapter:
    return KafkaAdapter(
        runtime_options=flows(),
        kafka=settings(config, stats),
        cassandra=cassandra(config),
        redis_url=config["redis"],
        namespace=config["topic"],
        key_prefix=f"bench:{config['topic']}:",
        concurrency=CONCURRENCY,
        poll_seconds=0.5,
    )


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    stats = KafkaStats()
    redis_calls: Counter[str] = Counter()
    count_redis(redis_calls)
    adapter = make_adapter(config, stats)

    async def calls() -> dict[str, int]:
        cql = adapter.cassandra_client.requests if adapter.cassandra_client else 0
        await asyncio.sleep(0.6)  # one more statistics report
        kafka = {f"kafka.{k}": v for k, v in stats.totals().items()}
        return {"cql": cql, "redis": redis_calls["redis"], **kafka}

    return await work(adapter, config, calls)


def requests(calls: Counter[str]) -> dict[str, int]:
    return {
        "cassandra": calls["cql"],
        "redis": calls["redis"],
        "kafka_produce": calls["kafka.Produce"],
        "kafka_messages": calls["kafka.messages"],
        "kafka_all": total(calls, "kafka.", but=["kafka.messages"]),
    }


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    base = {**urls, "topic": f"bench-{uuid.uuid4().hex[:10]}", "keyspace": "flowcraft_bench"}
    setup = await CassandraClient.connect(cassandra(base))
    try:
        await create_schema(setup)
    finally:
        await setup.aclose()
    await create_topics(
        {"bootstrap.servers": base["kafka"]}, [base["topic"]], partitions=PARTITIONS
    )
    client = make_adapter(base)
    procs = WorkerProcesses(__file__, base, workers, prefix="bench-kafka-")
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
    {
        "cassandra": "cql",
        "redis": "redis",
        "kafka_produce": "produce",
        "kafka_messages": "msgs",
        "kafka_all": "kafka",
    }
)

if __name__ == "__main__":
    main(
        __doc__,
        runs=200,
        worker=worker_main,
        services={"kafka": "kafka", "cassandra": "cassandra", "redis": "redis"},
        measure=measure,
        header=HEADER,
        row=row,
    )
