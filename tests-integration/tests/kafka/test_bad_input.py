"""Bad jobs put on the topic with confluent-kafka's own producer (not the adapter): raw
garbage, a payload missing fields, an unknown blueprint, an unknown node of a run. Each is
dead-lettered with its reason while the worker keeps running, and a good run still
completes after them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_asyncio
from confluent_kafka import Producer

from flowcraft import Flow, RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_kafka import (
    CassandraClient,
    CassandraSettings,
    KafkaAdapter,
    KafkaSettings,
    create_schema,
    create_topics,
)

BAD = {
    b"\x00\xff garbage {": "PayloadDecodeError",
    b'{"runId": "r1"}': "PayloadDecodeError",
    json.dumps({"runId": "r2", "blueprintId": "nope", "nodeId": "a"}).encode(): (
        "UnknownBlueprintError"
    ),
    json.dumps({"runId": "r3", "blueprintId": "ok", "nodeId": "nope"}).encode(): (
        "UnknownNodeError"
    ),
}

FLOW = Flow("ok").node("a", lambda ctx: 1).node("b", lambda ctx: ctx.input + 1).chain("a", "b")


@pytest.fixture
async def adapter(
    kafka_service: RunningService,
    cassandra_service: RunningService,
    redis_service: RunningService,
) -> AsyncIterator[KafkaAdapter]:
    tag = uuid.uuid4().hex[:10]
    kafka = KafkaSettings(bootstrap_servers=kafka_service.url, topic=f"fc-bad-{tag}")
    await create_topics(
        {"bootstrap.servers": kafka.bootstrap_servers}, [kafka.topic, kafka.dead_letters]
    )
    cassandra = await CassandraClient.connect(
        CassandraSettings.from_address(
            cassandra_service.url,
            keyspace=f"fc_bad_{tag}",
            local_datacenter=cassandra_service.extra.get("local_datacenter", "datacenter1"),
            consistency="ONE",
            serial_consistency="SERIAL",
        )
    )
    await create_schema(cassandra)
    made = KafkaAdapter(
        runtime_options=RuntimeOptions.from_flows(FLOW),
        kafka=kafka,
        cassandra_client=cassandra,
        redis_url=redis_service.url,
        key_prefix=f"fc-bad:{tag}:",
        poll_seconds=0.2,
    )
    try:
        yield made
    finally:
        await made.aclose()
        await cassandra.execute_schema(f"DROP KEYSPACE IF EXISTS fc_bad_{tag}")
        await cassandra.aclose()
        redis = redis_asyncio.Redis.from_url(redis_service.url)
        try:
            keys = [k async for k in redis.scan_iter(match=f"fc-bad:{tag}:*", count=1000)]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()


async def test_bad_jobs_are_dead_lettered_and_the_worker_keeps_running(
    adapter: KafkaAdapter,
) -> None:
    # r3 exists, so its job for a node the blueprint lacks is an unknown node (a job
    # for a run nobody started is refused as an unknown run first).
    await adapter.start_run("ok", run_id="r3")
    producer = Producer({"bootstrap.servers": adapter.kafka.bootstrap_servers})
    for body in BAD:
        producer.produce(adapter.kafka.topic, value=body)
    assert await asyncio.to_thread(producer.flush, 30) == 0
    worker = asyncio.ensure_future(adapter.worker())
    try:
        async with asyncio.timeout(60):
            while len(letters := await adapter.dead_letters()) < len(BAD):
                assert not worker.done(), worker
                await asyncio.sleep(0.3)
        assert sorted(letter.reason.partition(":")[0] for letter in letters) == sorted(BAD.values())
        for letter in letters:
            body = next(b for b in BAD if b.decode("utf-8", "replace") == letter.body)
            assert letter.reason.startswith(BAD[body])
        run_id = await adapter.start_run("ok")
        result = await adapter.wait_for_result(run_id, timeout=30)
        assert result.status == "completed"
        assert result.context["_outputs.b"] == 2
        assert not worker.done()
    finally:
        await adapter.stop()
        await worker
