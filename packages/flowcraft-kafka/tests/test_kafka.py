"""The queue primitives on the real Kafka: receive bounds, delayed release, dead letters
with their reason, commits that stop at the first unfinished job, delivery counting
(poison messages), the paused keep-alive, and jobs spread over partitions."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.payload import JobPayload
from flowcraft_kafka import KafkaAdapter, KafkaSettings, create_topics
from flowcraft_kafka._kafka import HEADER_REASON, HEADER_SOURCE, KafkaJob

from .conftest import Namespace

FLOW = Flow("noop").node("a", lambda c: 1)


def _options() -> RuntimeOptions:
    return RuntimeOptions.from_flows(FLOW)


async def _receive_all(adapter: KafkaAdapter, n: int, seconds: float = 30.0) -> list[KafkaJob]:
    found: list[KafkaJob] = []
    deadline = time.monotonic() + seconds
    while len(found) < n and time.monotonic() < deadline:
        found.extend(await adapter.receive(n - len(found)))
    return found


async def _single_partition(ns: Namespace) -> KafkaSettings:
    kafka = ns.kafka.model_copy(update={"topic": ns.kafka.topic + "-one"})
    await create_topics(
        {"bootstrap.servers": kafka.bootstrap_servers},
        [kafka.topic, kafka.dead_letters],
        partitions=1,
    )
    return kafka


def _committed(kafka: KafkaSettings, partition: int = 0) -> int:
    reader = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": kafka.group_id})
    try:
        (tp,) = reader.committed([TopicPartition(kafka.topic, partition)], timeout=10)
        return tp.offset
    finally:
        reader.close()


async def test_receive_never_returns_more_than_asked(kafka_namespace: Namespace) -> None:
    adapter = kafka_namespace.adapter(_options())
    for i in range(20):
        await adapter.enqueue_raw(f"m{i}".encode())
    seen: list[KafkaJob] = []
    deadline = time.monotonic() + 30
    while len(seen) < 20 and time.monotonic() < deadline:
        got = await adapter.receive(3)
        assert len(got) <= 3
        seen.extend(got)
    assert sorted(j.value for j in seen) == sorted(f"m{i}".encode() for i in range(20))


async def test_jobs_of_one_run_spread_over_partitions(kafka_namespace: Namespace) -> None:
    """No key: a run's parallel branches are not serialised on one partition."""
    adapter = kafka_namespace.adapter(_options())
    jobs = [JobPayload(run_id="one-run", blueprint_id="noop", node_id=f"n{i}") for i in range(40)]
    for job in jobs:  # one at a time: the sticky partitioner moves on between batches
        await adapter.enqueue_jobs([job])
        await asyncio.sleep(0.01)
    got = await _receive_all(adapter, 40)
    assert len({j.partition for j in got}) > 1


async def test_release_delays_the_copy_and_finishes_the_original(
    kafka_namespace: Namespace,
) -> None:
    kafka = await _single_partition(kafka_namespace)
    adapter = kafka_namespace.adapter(_options(), kafka=kafka)
    await adapter.enqueue_raw(b"later")
    (first,) = await _receive_all(adapter, 1)
    released_at = time.time()
    await adapter.release(first, 2.0)
    copy: list[KafkaJob] = []
    while not copy:
        copy = list(await adapter.receive(1))
        if not copy:
            assert time.time() - released_at < 15
    assert time.time() - released_at >= 2.0
    assert copy[0].value == b"later"
    assert copy[0].offset > first.offset
    await adapter.ack(copy)
    await asyncio.sleep(1.5)  # the background commit
    assert _committed(kafka) == copy[0].offset + 1


async def test_dead_letter_keeps_the_reason_and_body(kafka_namespace: Namespace) -> None:
    adapter = kafka_namespace.adapter(_options())
    await adapter.enqueue_raw(b"\xff not a job")
    (job,) = await _receive_all(adapter, 1)
    await adapter.dead_letter(job, "PayloadDecodeError: not UTF-8 \U0001f680")
    (letter,) = await adapter.dead_letters()
    assert letter.reason == "PayloadDecodeError: not UTF-8 \U0001f680"
    assert letter.body == b"\xff not a job".decode("utf-8", "replace")
    assert letter.id.endswith(f"/{job.partition}/{job.offset}")


async def test_a_job_parked_twice_is_listed_once(kafka_namespace: Namespace) -> None:
    """At least once: a member that parked a job may lose its partition before the
    offset is committed, and the next member parks the job again."""
    adapter = kafka_namespace.adapter(_options())
    await adapter.enqueue_raw(b"garbage")
    await adapter.enqueue_raw(b"more garbage")
    first, second = sorted(await _receive_all(adapter, 2), key=lambda j: j.value)
    await adapter.dead_letter(first, "PayloadDecodeError: first")
    await adapter.dead_letter(second, "PayloadDecodeError: second")
    again = [
        (HEADER_REASON, b"PayloadDecodeError: again"),
        (HEADER_SOURCE, first.where.encode()),
    ]
    await adapter.producer.send(kafka_namespace.kafka.dead_letters, first.value, again)
    letters = sorted(await adapter.dead_letters(), key=lambda letter: letter.body)
    assert [(letter.body, letter.id) for letter in letters] == [
        ("garbage", first.where),
        ("more garbage", second.where),
    ]
    # Either copy (the topic's partitions are read in no set order).
    assert letters[0].reason in ("PayloadDecodeError: first", "PayloadDecodeError: again")
    assert letters[1].reason == "PayloadDecodeError: second"


async def test_a_limit_counts_letters_not_copies(kafka_namespace: Namespace) -> None:
    """Copies of a letter parked again do not take the places of other letters."""
    adapter = kafka_namespace.adapter(_options())
    await adapter.enqueue_raw(b"garbage")
    await adapter.enqueue_raw(b"more garbage")
    first, second = sorted(await _receive_all(adapter, 2), key=lambda j: j.value)
    await adapter.dead_letter(first, "PayloadDecodeError: first")
    again = [
        (HEADER_REASON, b"PayloadDecodeError: again"),
        (HEADER_SOURCE, first.where.encode()),
    ]
    for _ in range(5):
        await adapter.producer.send(kafka_namespace.kafka.dead_letters, first.value, again)
    await adapter.dead_letter(second, "PayloadDecodeError: second")
    letters = await adapter.dead_letters(limit=2)
    assert sorted(letter.id for letter in letters) == sorted([first.where, second.where])
    assert [letter.id for letter in await adapter.dead_letters(limit=1)] in (
        [first.where],
        [second.where],
    )


async def test_commit_stops_at_the_first_unfinished_job(kafka_namespace: Namespace) -> None:
    """Jobs of one partition finish out of order; the group commits up to the first
    one still running, and the next member starts there."""
    kafka = await _single_partition(kafka_namespace)
    first = kafka_namespace.adapter(_options(), kafka=kafka)
    for i in range(10):
        await first.enqueue_raw(f"j{i}".encode())
    jobs = await _receive_all(first, 10)
    assert [j.offset for j in jobs] == list(range(10))
    await first.ack([j for j in jobs if j.offset != 3])
    await asyncio.sleep(1.5)
    assert _committed(kafka) == 3
    await first.ack([jobs[3]])
    await asyncio.sleep(1.5)
    assert _committed(kafka) == 10
    # A member that leaves with 10 and 12 unfinished and 11 done: the next one gets
    # exactly 10 and 12 (the commit's metadata says 11 is done).
    for i in range(10, 13):
        await first.enqueue_raw(f"j{i}".encode())
    more = await _receive_all(first, 3)
    await first.ack([more[1]])
    await first.consumer.aclose()  # leaves the group; unfinished jobs stay uncommitted
    first._consumer = None
    second = kafka_namespace.adapter(_options(), kafka=kafka)
    again = await _receive_all(second, 2)
    assert [j.offset for j in again[:2]] == [10, 12]
    assert await second.receive(5) == []


async def test_deliveries_are_counted_and_a_poison_job_dead_lettered(
    kafka_namespace: Namespace,
) -> None:
    """A job whose worker dies before settling it comes back; each delivery counts,
    and past max_deliveries the worker dead-letters it without running it."""
    kafka = await _single_partition(kafka_namespace)
    ran: list[int] = []

    async def poison(ctx: NodeContext) -> int:
        ran.append(1)
        return 1

    flow = Flow("poison").node("a", poison)
    options = RuntimeOptions.from_flows(flow)
    seed = kafka_namespace.adapter(options, kafka=kafka)
    await seed.enqueue_job(JobPayload(run_id="r", blueprint_id="poison", node_id="a"))
    for expected in (1, 2):
        dying = kafka_namespace.adapter(options, kafka=kafka)
        (job,) = await _receive_all(dying, 1)
        assert job.deliveries == expected
        await dying.consumer.aclose()  # "dies" without settling
        dying._consumer = None
    worker = kafka_namespace.adapter(options, kafka=kafka, max_deliveries=2)
    task = asyncio.ensure_future(worker.worker())
    try:
        deadline = time.monotonic() + 30
        letters: list[Any] = []
        while not letters and time.monotonic() < deadline:
            letters = await worker.dead_letters()
            await asyncio.sleep(0.3)
    finally:
        await worker.stop()
        await task
    assert ran == []
    assert "delivered 3 times" in letters[0].reason


async def test_a_busy_worker_stays_in_its_group(kafka_namespace: Namespace) -> None:
    """Every slot busy for longer than max.poll.interval.ms: the paused keep-alive
    polls, so the member is not thrown out and its job is not delivered again."""
    kafka = kafka_namespace.kafka.model_copy(
        update={
            "consumer_config": {"session.timeout.ms": 6000, "max.poll.interval.ms": 7000},
        }
    )
    runs: list[str] = []

    async def slow(ctx: NodeContext) -> str:
        runs.append(ctx.run_id)
        await asyncio.sleep(10)
        return "done"

    flow = Flow("slow").node("s", slow)
    options = RuntimeOptions.from_flows(flow)
    worker = kafka_namespace.adapter(options, kafka=kafka, concurrency=1, lease_seconds=30)
    task = asyncio.ensure_future(worker.worker())
    try:
        run_id = await worker.start_run("slow")
        result = await worker.wait_for_result(run_id, timeout=40)
    finally:
        await worker.stop()
        await task
    assert result.status == "completed"
    assert runs == [run_id]


async def test_delivery_counters_live_while_their_message_is_in_flight(
    kafka_namespace: Namespace,
) -> None:
    """A counter per message would pile up in Redis; each one is deleted with the next
    poll's pipeline once its message is settled."""
    adapter = kafka_namespace.adapter(_options())
    prefix = f"{kafka_namespace.key_prefix}kafka:deliveries:{kafka_namespace.kafka.group_id}:"

    async def counters() -> set[str]:
        keys = [k async for k in adapter.redis.scan_iter(match=prefix + "*", count=1000)]
        return {k.decode() if isinstance(k, bytes) else k for k in keys}

    for i in range(3):
        await adapter.enqueue_raw(f"c{i}".encode())
    first = await _receive_all(adapter, 3)
    assert len(await counters()) == 3
    await adapter.ack(first[:2])
    await adapter.dead_letter(first[2], "test")
    await adapter.enqueue_raw(b"c3")
    (last,) = await _receive_all(adapter, 1)
    assert await counters() == {prefix + last.where}


async def test_a_partition_paused_by_the_keep_alive_comes_back_fetching(
    kafka_namespace: Namespace,
) -> None:
    """librdkafka keeps a pause on the partition, beyond the assignment: partitions the
    keep-alive paused, moved to another member, then assigned back came back paused,
    and their jobs were never fetched (runs stranded in CI after a Kafka restart)."""
    from confluent_kafka import Producer

    owner = kafka_namespace.adapter(_options())
    first = owner.consumer
    other = kafka_namespace.adapter(_options())
    second = other.consumer

    async def until(check: Any, *polls: Any) -> None:
        async with asyncio.timeout(60):
            while not check():
                for poll in polls:
                    await poll()

    async def keep_alive() -> None:
        await first._call(first._keep_alive_sync)
        await asyncio.sleep(0.05)

    async def receive(consumer: Any) -> None:
        assert await consumer.receive(10) == []  # nothing produced yet

    await until(lambda: len(first._partitions) == 4, lambda: receive(first))
    # Every slot busy: the keep-alive pauses all four; a second member takes two.
    await until(lambda: len(second._partitions) == 2, keep_alive, lambda: receive(second))
    moved = sorted(second._partitions)
    await receive(first)  # resumes what it still has
    await other.aclose()  # leaves the group: the two come back to the first member
    await until(lambda: len(first._partitions) == 4, lambda: receive(first))

    producer = Producer({"bootstrap.servers": kafka_namespace.kafka.bootstrap_servers})
    for partition in range(4):
        for i in range(3):
            producer.produce(kafka_namespace.kafka.topic, f"p{partition}-{i}", partition=partition)
    assert producer.flush(30) == 0
    got = await _receive_all(owner, 12)
    by_partition = {p: sorted(j.value.decode() for j in got if j.partition == p) for p in range(4)}
    assert all(len(v) == 3 for v in by_partition.values()), (moved, by_partition)
