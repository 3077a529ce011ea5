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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def worker_main(config: dict[str, Any]) -> dict[str, Any]:
    """One worker process: handle jobs until SIGTERM; returns its counts."""
    stats = KafkaStats()
    calls: Counter[str] = Counter()
    count_redis(calls)
    adapter = make_adapter(config, stats)
    counter = JobCounter(adapter)
    cpu = cpu_seconds()
    try:
        await serve(adapter, config)
    finally:
        cpu = cpu_seconds() - cpu
        cql = adapter.cassandra_client.requests if adapter.cassandra_client else 0
        await asyncio.sleep(0.6)  # one more statistics report
        kafka = stats.totals()
        await adapter.aclose()
    return {
        "jobs": counter.jobs,
        "cpu_s": cpu,
        "calls": {
            "cql": cql,
            "redis": calls["redis"],
            **{f"kafka.{k}": v for k, v in kafka.items()},
        },
    }


async def measure(
    urls: dict[str, str], args: Namespace, shape: str, workers: int
) -> dict[str, Any]:
    runs = args.runs
    tag = uuid.uuid4().hex[:10]
    base = {**urls, "topic": f"bench-{tag}", "keyspace": "flowcraft_bench"}
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
    kafka = sum(v for k, v in calls.items() if k.startswith("kafka.") and k != "kafka.messages")

    def per_job(n: float) -> float:
        return round(n / jobs, 2)

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
            "cassandra": per_job(calls["cql"]),
            "redis": per_job(calls["redis"]),
            "kafka_produce": per_job(calls["kafka.Produce"]),
            "kafka_messages": per_job(calls["kafka.messages"]),
            "kafka_all": per_job(kafka),
        },
        "worker_requests": dict(sorted(calls.items())),
    }


HEADER = (
    f"{'shape':<8} {'workers':>7} {'runs':>5} {'jobs':>6} {'jobs/s':>7} {'runs/s':>7} "
    f"{'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'cpu ms':>7} {'cql':>5} {'redis':>5} "
    f"{'produce':>7} {'msgs':>5} {'kafka':>6}"
)


def row(r: dict[str, Any]) -> str:
    lat, calls = r["latency_ms"], r["requests_per_job"]
    return (
        f"{r['shape']:<8} {r['workers']:>7} {r['runs']:>5} {r['node_jobs']:>6} "
        f"{r['jobs_per_s']:>7} {r['runs_per_s']:>7} {lat['p50']:>8} {lat['p95']:>8} "
        f"{lat['max']:>8} {r['worker_cpu_ms_per_node_job']:>7} {calls['cassandra']:>5} "
        f"{calls['redis']:>5} {calls['kafka_produce']:>7} {calls['kafka_messages']:>5} "
        f"{calls['kafka_all']:>6}"
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
