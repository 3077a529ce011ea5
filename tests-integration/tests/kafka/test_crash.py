"""Crash test on the real Kafka, Cassandra and Redis: two worker processes, one
SIGKILLed again and again while 200 diamond runs go through. Every run completes
exactly once, no join fires early, every publication of a run is the same result, and
nothing is left behind: the group has consumed every job, no dead letters, no
counters. The time from each kill to the next node execution is printed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from confluent_kafka import Consumer, TopicPartition

from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import (
    WorkerProcesses,
    all_published,
    check_counters,
    check_exactly_once,
    client_options,
)
from flowcraft_kafka import CassandraClient, KafkaAdapter, create_schema, create_topics
from flowcraft_kafka._kafka import _skipped

from .kafka_fleet import Settings

# Past all_published's wait, its report of the unfinished runs (not a thread dump).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

RUNS = 200
PARTITIONS = 8
FLEET = Path(__file__).with_name("kafka_fleet.py")


@pytest.fixture
async def fleet(
    kafka_service: RunningService,
    cassandra_service: RunningService,
    redis_service: RunningService,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        bootstrap_servers=kafka_service.url,
        topic=f"fc-crash-{tag}",
        cassandra_address=cassandra_service.url,
        local_datacenter=cassandra_service.extra.get("local_datacenter", "datacenter1"),
        keyspace=f"fc_crash_{tag}",
        redis_url=redis_service.url,
        key_prefix=f"fc-crash:{tag}:",
        effects_path=str(tmp_path / "effects.jsonl"),
    )
    kafka = settings.kafka()
    await create_topics(
        {"bootstrap.servers": kafka.bootstrap_servers},
        [kafka.topic, kafka.dead_letters],
        partitions=PARTITIONS,
    )
    cassandra = await CassandraClient.connect(settings.cassandra())
    try:
        await create_schema(cassandra)
        yield settings
        for _ in range(30):  # the restart test may leave the node just back up
            try:
                await cassandra.execute_schema(f"DROP KEYSPACE IF EXISTS {settings.keyspace}")
                break
            except Exception:
                await asyncio.sleep(1.0)
    finally:
        await cassandra.aclose()
    redis = redis_asyncio.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in redis.scan_iter(match=settings.key_prefix + "*", count=1000)]
        if keys:
            await redis.delete(*keys)
    finally:
        await redis.aclose()


def _left(settings: Settings) -> list[bytes]:
    """The jobs on the topic the group has not finished: past its committed offsets and
    not among the offsets done past them (the commit's metadata)."""
    kafka = settings.kafka()
    reader = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": kafka.group_id,
            "enable.auto.commit": False,
        }
    )
    try:
        parts = [TopicPartition(kafka.topic, p) for p in range(PARTITIONS)]
        wanted: list[tuple[int, int]] = []
        for tp in reader.committed(parts, timeout=10):
            _, high = reader.get_watermark_offsets(tp, timeout=10)
            done = _skipped(tp.offset, tp.metadata)
            start = max(tp.offset, 0)
            wanted += [(tp.partition, o) for o in range(start, high) if o not in done]
        bodies: list[bytes] = []
        for partition, offset in wanted:
            reader.assign([TopicPartition(kafka.topic, partition, offset)])
            message = reader.poll(10)
            assert message is not None, f"offset {offset} of partition {partition} unread"
            assert message.error() is None, message.error()
            bodies.append(bytes(message.value() or b""))
        return bodies
    finally:
        reader.close()


async def check_nothing_left(settings: Settings, client: KafkaAdapter, runs: list[str]) -> None:
    """What the group left unfinished may only be jobs of runs that ended (a copy a
    worker held for later when it stopped): delivered again, each is dropped."""
    left = await asyncio.to_thread(_left, settings)
    pending = [json.loads(b)["runId"] for b in left]
    assert set(pending) <= set(runs), f"jobs of unknown runs left: {pending}"
    for run_id in set(pending):
        result = await client.get_final_result(run_id)
        assert result is not None, f"{run_id} has jobs left and no result"
        assert result.status == "completed", f"{run_id} left {result.status}"
    print(f"jobs left for later (of ended runs): {len(left)}")
    assert await client.dead_letters() == []
    await check_counters(settings.redis_url, settings.key_prefix, client.state_ttl_seconds)


async def test_two_workers_one_sigkilled_repeatedly(fleet: Settings) -> None:
    workers = WorkerProcesses(FLEET, fleet)
    client = fleet.adapter(client_options(fleet))
    codes: list[int | None] = []
    try:
        runs = [await client.start_run("diamond") for _ in range(RUNS)]
        keys = [client.results.key(r) for r in runs]
        done = all_published(client.redis, keys, 420, client=client, runs=runs)
        kills = await workers.kill_one_repeatedly(done, seed=11, max_kills=8)
        print(workers.report(RUNS, kills))
        assert kills >= 3, f"the runs finished after {kills} kills; the test needs more work"
        await check_exactly_once(client, runs, fleet.effects_path)
        codes = await workers.stop()
        await check_nothing_left(fleet, client, runs)
    finally:
        if not codes:
            codes = await workers.stop()
        await client.aclose()
    assert codes == [0, 0], "a worker did not stop gracefully on SIGTERM"
