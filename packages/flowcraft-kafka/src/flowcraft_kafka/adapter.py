"""``KafkaAdapter``: node jobs on Kafka, run state in Cassandra, coordination in Redis.

The base classes run everything else; this module maps the pull loop's calls to
Kafka (see :mod:`flowcraft_kafka._kafka` for the consumer's offsets, pauses and
delays):

=================  ==============================================================
``receive``        a poll of the group's consumer (released copies held until due);
                   each new offset's delivery is counted in Redis (one pipeline)
``ack``            the offsets are done: each partition's first unfinished offset
                   is stored and committed in the background
``renew``          nothing: a received job is not redelivered while its member
                   lives and polls (a keep-alive polls, paused, at full capacity)
``release``        a copy with a ``flowcraft-not-before`` header, confirmed, then
                   the original is done (Kafka has no nack and no delay)
``dead_letter``    a copy on the dead-letter topic with the reason header, confirmed,
                   then the original is done
``enqueue_job``    an idempotent ``acks=all`` produce, awaited; no key, so a run's
                   branches spread over the partitions
=================  ==============================================================

Results are the core's :class:`~flowcraft.distributed.redis.RedisResults` (stored
first-wins, waiters woken by ``PUBLISH``); the context is a
:class:`~flowcraft_kafka.CassandraContext`.

Poison messages: a job that kills its worker is never settled, so Kafka delivers
it again to the next member, forever. The adapter counts deliveries per topic,
partition and offset in Redis; past ``max_deliveries`` the pull loop
dead-letters it without running it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flowcraft.distributed.delivery import DeadLetter
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft.distributed.redis import RedisCoordinationStore, RedisResults
from flowcraft.runtime import RuntimeOptions
from flowcraft_kafka._cassandra import (
    DEFAULT_MAX_PATCH_BYTES,
    CassandraClient,
    CassandraRunStore,
    create_schema,
)
from flowcraft_kafka._kafka import (
    HEADER_NOT_BEFORE,
    HEADER_REASON,
    HEADER_SOURCE,
    JobConsumer,
    JobProducer,
    KafkaJob,
    create_topics,
    headers_of,
    read_topic,
)
from flowcraft_kafka._settings import CassandraSettings, KafkaSettings
from flowcraft_kafka.context import CassandraContext

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from flowcraft.distributed.adapter import FinalResult

__all__ = ["KafkaAdapter"]

#: A delivery counter outlives its message's settlement only if the DEL that follows
#: it is lost (the worker stopped first): then it expires.
_DELIVERY_TTL_SECONDS = 24 * 3600


class KafkaAdapter(PullingAdapter[KafkaJob]):
    """A flowcraft worker (and operator client) on Kafka, Cassandra and Redis.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        kafka: the bootstrap servers, job topic, dead-letter topic, consumer group
            and any librdkafka settings (TLS, SASL) for every Kafka client.
        cassandra / cassandra_client: settings to connect with (on first use; closed
            by :meth:`aclose`), or a shared connected :class:`CassandraClient`.
        redis_url / redis_client: Redis for coordination, results and delivery
            counts (a URL's client is owned; a given client stays open).
        namespace: the Cassandra partition prefix of this app's runs.
        concurrency: jobs in hand at once (of any partitions).
        max_deliveries: dead-letter a message delivered this often without being
            settled (it kills its worker).
        poll_seconds: the longest a poll waits when no job is ready.
        commit_interval_ms: how often done offsets are committed.
        partitions: used by :meth:`create_topics`.
        max_patch_bytes: the largest patch (keys and values) the context accepts.
        redis_options: passed to the Redis connection pool (TLS, password...).
        **options: see :class:`PullingAdapter` and ``BaseDistributedAdapter``.
    """

    concurrent_enqueues = True
    results: RedisResults
    max_delay_seconds = 300.0
    """A released copy is held by its consumer until due, and its partition's committed
    offset cannot pass it meanwhile: a long sleep is re-sent every 5 minutes instead,
    so a restart never redelivers more than that much of the partition."""

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        kafka: KafkaSettings,
        cassandra: CassandraSettings | None = None,
        cassandra_client: CassandraClient | None = None,
        redis_url: str | None = None,
        redis_client: Redis | None = None,
        namespace: str = "flowcraft",
        concurrency: int = 16,
        max_deliveries: int | None = 5,
        poll_seconds: float = 0.5,
        commit_interval_ms: int = 500,
        partitions: int = 12,
        max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
        redis_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if (cassandra is None) == (cassandra_client is None):
            raise ValueError("pass exactly one of cassandra= or cassandra_client=")
        if (redis_url is None) == (redis_client is None):
            raise ValueError("pass exactly one of redis_url= or redis_client=")
        if redis_client is None:
            import redis.asyncio as redis_asyncio

            assert redis_url is not None
            pool = redis_asyncio.BlockingConnectionPool.from_url(
                redis_url, **({"max_connections": 64} | (redis_options or {}))
            )
            redis_client = redis_asyncio.Redis.from_pool(pool)
            self._owns_redis = True
        else:
            self._owns_redis = False
        self.redis: Redis = redis_client
        options.setdefault(
            "coordination_store",
            RedisCoordinationStore(
                client=redis_client, key_prefix=options.get("key_prefix", "flowcraft:")
            ),
        )
        options.setdefault("visibility_seconds", 3600.0)  # renew is free: see the docstring
        super().__init__(
            runtime_options=runtime_options,
            concurrency=concurrency,
            max_deliveries=max_deliveries,
            **options,
        )
        self.kafka = kafka
        self.partitions = partitions
        self.poll_seconds = poll_seconds
        self.commit_interval_ms = commit_interval_ms
        self._cassandra_settings = cassandra
        self._owns_cassandra = cassandra_client is None
        self.cassandra_client = cassandra_client
        self.runs = CassandraRunStore(
            cassandra_client if cassandra_client is not None else self._connect_cassandra,
            namespace,
            ttl_seconds=self.state_ttl_seconds,
            max_patch_bytes=max_patch_bytes,
        )
        self.results = RedisResults(
            redis_client, key_prefix=self.key_prefix, ttl_seconds=self.state_ttl_seconds
        )
        self._producer: JobProducer | None = None
        self._consumer: JobConsumer | None = None
        self._deliveries_prefix = f"{self.key_prefix}kafka:deliveries:{kafka.group_id}:"
        self._settled: list[str] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}(topic={self.kafka.topic!r}, worker_id={self.worker_id!r})"

    async def _connect_cassandra(self) -> CassandraClient:
        assert self._cassandra_settings is not None
        self.cassandra_client = await CassandraClient.connect(self._cassandra_settings)
        return self.cassandra_client

    @property
    def producer(self) -> JobProducer:
        if self._producer is None:
            self._producer = JobProducer(self._client_config() | self.kafka.producer_config)
        return self._producer

    def _client_config(self) -> dict[str, Any]:
        return {**self.kafka.kafka_config, "bootstrap.servers": self.kafka.bootstrap_servers}

    async def create_topics(self, **topic_config: str) -> None:
        """Create the job and dead-letter topics with ``partitions`` partitions
        (existing topics are left alone)."""
        await create_topics(
            self._client_config(),
            [self.kafka.topic, self.kafka.dead_letters],
            partitions=self.partitions,
            topic_config=topic_config,
        )

    async def create_schema(self, replication: Mapping[str, Any] | None = None) -> None:
        """Create the keyspace (if missing, with ``replication``; default SimpleStrategy
        with one replica, for development) and the state table. Idempotent."""
        await create_schema(await self.runs.connected(), replication=replication)

    # ------------------------------------------------------------ the seed's primitives

    def create_context(self, run_id: str) -> CassandraContext:
        return CassandraContext(self.runs, run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.producer.send(self.kafka.topic, job.encode())

    async def enqueue_raw(self, body: bytes) -> None:
        await self.producer.send(self.kafka.topic, body)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        await self.results.publish(result)

    # ------------------------------------------------------------ the pull loop's calls

    @property
    def consumer(self) -> JobConsumer:
        if self._consumer is None:
            self._consumer = JobConsumer(
                self._client_config() | self.kafka.consumer_config,
                self.kafka.topic,
                group_id=self.kafka.group_id,
                poll_seconds=self.poll_seconds,
                commit_interval_ms=self.commit_interval_ms,
            )
        return self._consumer

    async def receive(self, max_messages: int) -> Sequence[KafkaJob]:
        jobs = await self.consumer.receive(max_messages)
        fresh = [job for job in jobs if job.deliveries is None]
        if fresh:
            await self._count_deliveries(fresh)
        return jobs

    async def _count_deliveries(self, jobs: Sequence[KafkaJob]) -> None:
        """INCR a counter per offset, in one pipeline that also deletes the counters of
        the messages settled since the last one (a counter lives while its message is
        in flight). Without Redis the count is unknown (the job still runs)."""
        settled, self._settled = self._settled, []
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if settled:
                    pipe.delete(*settled)
                for job in jobs:
                    key = self._delivery_key(job)
                    pipe.incr(key)
                    pipe.expire(key, _DELIVERY_TTL_SECONDS)
                replies = await pipe.execute()
        except Exception as exc:
            self.logger.warning("counting deliveries failed: %r", exc)
            return
        counts = replies[1::2] if settled else replies[::2]
        for job, count in zip(jobs, counts, strict=True):
            job.deliveries = int(count)

    def _delivery_key(self, job: KafkaJob) -> str:
        return f"{self._deliveries_prefix}{job.where}"

    def _settle(self, jobs: Sequence[KafkaJob]) -> None:
        """Their delivery counters go with the next receive's pipeline."""
        self._settled.extend(self._delivery_key(job) for job in jobs if job.deliveries is not None)

    def message_body(self, message: KafkaJob) -> bytes:
        return message.value

    def delivery_count(self, message: KafkaJob) -> int | None:
        return message.deliveries

    async def ack(self, messages: Sequence[KafkaJob]) -> None:
        await self.consumer.done(messages)
        self._settle(messages)

    async def renew(self, message: KafkaJob, seconds: float) -> None:
        """Nothing to do: see the module docstring."""

    async def release(self, message: KafkaJob, delay_seconds: float) -> None:
        """Produce a copy due in ``delay_seconds`` (confirmed), then mark the original
        done. While stopping, the original is simply left unfinished: the group
        delivers it again from the committed offset."""
        if self.stopping:
            return
        due = math.ceil((time.time() + max(0.0, delay_seconds)) * 1000)
        headers = [
            (HEADER_NOT_BEFORE, str(due).encode()),
            (HEADER_SOURCE, message.where.encode()),
        ]
        try:
            await self.producer.send(self.kafka.topic, message.value, headers)
        except Exception as exc:
            # Kafka refused the copy: run the original here again once it is due
            # (it stays unfinished, so a crash meanwhile redelivers it).
            self.logger.warning("release of %s: producing its copy failed (%r)", message.where, exc)
            self.consumer.hold(message, due / 1000)
            return
        await self.consumer.done([message])
        self._settle([message])

    async def dead_letter(self, message: KafkaJob, reason: str) -> None:
        headers = [
            (HEADER_REASON, reason.encode("utf-8", "replace")[:16_384]),
            (HEADER_SOURCE, message.where.encode()),
        ]
        await self.producer.send(self.kafka.dead_letters, message.value, headers)
        await self.consumer.done([message])
        self._settle([message])

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The dead-letter topic from its beginning (at most ``limit``; nothing removed).
        A letter's ``id`` is where its job was: ``topic/partition/offset``. A job parked
        twice (its offset was not committed yet when a rebalance gave it to another
        member, which parked it again) is listed once."""
        found = await asyncio.to_thread(
            read_topic,
            self._client_config(),
            self.kafka.dead_letters,
            limit,
            key=_letter_key,
        )
        letters = []
        for message in found:
            headers = headers_of(message)
            letters.append(
                DeadLetter(
                    bytes(message.value() or b"").decode("utf-8", "replace"),
                    headers.get(HEADER_REASON, b"").decode("utf-8", "replace"),
                    headers.get(HEADER_SOURCE, b"").decode("utf-8", "replace"),
                )
            )
        return letters

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Leave the group (committing what is done), flush the producer, close the
        clients this adapter made. A client that fails to close is logged; the rest
        are still closed."""
        steps: list[tuple[str, Any]] = []
        if self._consumer is not None:
            steps.append(("consumer", self._consumer.aclose))
            self._consumer = None
        if self._producer is not None:
            steps.append(("producer", self._producer.aclose))
            self._producer = None
        steps.append(("results listener", self.results.aclose))
        if self._owns_redis:
            steps.append(("redis", self.redis.aclose))
        if self._owns_cassandra and self.cassandra_client is not None:
            steps.append(("cassandra", self.cassandra_client.aclose))
            self.cassandra_client = None
        for name, close in steps:
            try:
                await close()
            except Exception as exc:
                self.logger.warning("closing the %s failed: %r", name, exc)


def _letter_key(message: Any) -> str:
    """Where a dead letter's job was (its id): a job parked twice has one. A message
    not written by a worker (no source header) is its own."""
    source = headers_of(message).get(HEADER_SOURCE, b"").decode("utf-8", "replace")
    return source or f"{message.partition()}/{message.offset()}"
