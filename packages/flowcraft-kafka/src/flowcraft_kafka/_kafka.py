"""Kafka clients behind asyncio: a producer whose deliveries are awaited, and a
consumer that runs many jobs of one partition at once and commits only what is done.

confluent-kafka (librdkafka) is a blocking C client with its own threads:

* The producer is idempotent with ``acks=all``. ``produce`` never blocks; its
  delivery report arrives on a thread that serves ``poll`` and is passed to an
  asyncio future with ``call_soon_threadsafe``, so ``send`` returns once the broker
  has the message. (The library's experimental asyncio producer buffers up to a
  second and takes no headers, which release and dead letters need.)
* The consumer is used from ONE thread (an executor of one worker): polls, pauses,
  commits and the rebalance callbacks all run there.

Offsets. Kafka remembers one committed offset per partition, while a worker runs
several jobs of a partition at once and they finish in any order. So automatic
offset storing is off: each partition tracks its received offsets that are not
done, and the offset stored (and committed in the background every
``auto.commit.interval.ms``) is the first unfinished one, with the offsets done
past it in the commit's metadata (ranges, up to ~3 KB). The next owner of the
partition reads that metadata and skips them, so a crash redelivers exactly the
unfinished jobs (plus those finished within the last commit interval:
duplicates, which the protocol drops). Revoked partitions are committed at once
in the rebalance callback; a lost partition commits nothing (another member owns
it now).

Capacity. When every slot is busy the adapter stops asking for messages, but a
consumer that does not poll for ``max.poll.interval.ms`` is thrown out of its
group. A keep-alive therefore polls about once a second with the assignment
paused: nothing is fetched, the rebalance callbacks run, and the member stays in
the group. Since a received message's job is never redelivered to the group while
its member lives and polls, there is no visibility to renew.

Delay. Kafka cannot deliver a message later. A release is a copy of the message,
produced (and confirmed) with a ``flowcraft-not-before`` header, after which the
original counts as done; the consumer holds a copy that arrives early until its
time (it stays unfinished, so it is not committed past).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

__all__ = [
    "HEADER_NOT_BEFORE",
    "HEADER_REASON",
    "HEADER_SOURCE",
    "JobConsumer",
    "JobProducer",
    "KafkaJob",
    "create_topics",
    "headers_of",
    "read_topic",
]

logger = logging.getLogger("flowcraft.kafka")

HEADER_NOT_BEFORE = "flowcraft-not-before"
"""Epoch milliseconds before which a released copy is not run."""
HEADER_REASON = "flowcraft-reason"
"""Why a message was dead-lettered."""
HEADER_SOURCE = "flowcraft-source"
"""``topic/partition/offset`` of the message a dead letter or copy came from."""

_KEEPALIVE_SECONDS = 1.0


def _client_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"flowcraft.kafka.{name}")


async def create_topics(
    config: Mapping[str, Any],
    topics: Iterable[str],
    *,
    partitions: int = 12,
    replication_factor: int = -1,
    topic_config: Mapping[str, str] | None = None,
    request_seconds: float = 30.0,
) -> None:
    """Create topics with ``partitions`` partitions (the broker's auto-created topics
    have its ``num.partitions``, often 1: one consumer of the group would get every
    job). An existing topic is left as it is. ``replication_factor=-1``: the broker's
    default."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    settings: dict[str, Any] = {**config, "logger": _client_logger("admin")}
    admin = AdminClient(settings)
    names = list(dict.fromkeys(topics))
    wanted = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=replication_factor,
            config=dict(topic_config or {}),
        )
        for name in names
    ]
    futures = admin.create_topics(wanted, request_timeout=request_seconds)
    # ``admin`` stays referenced until every answer is in: a collected client purges
    # them and its futures never resolve. The deadline covers a lost answer too.
    try:
        async with asyncio.timeout(request_seconds + 10):
            for name, future in futures.items():
                try:
                    await asyncio.wrap_future(future)
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
                logger.debug("topic %s ready", name)
    except TimeoutError:
        raise TimeoutError(
            f"creating topics {names}: no answer from Kafka in {request_seconds + 10:g} s"
        ) from None
    finally:
        del admin


class JobProducer:
    """An idempotent producer (``acks=all``) whose ``send`` returns once the broker has
    stored the message. Counts the messages it sends (``sent``)."""

    def __init__(self, config: Mapping[str, Any], *, linger_ms: float = 2.0) -> None:
        from confluent_kafka import Producer

        settings = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            # A send that the broker has not confirmed within 30 s fails (the job is
            # handed back and retried) instead of holding its slot for librdkafka's
            # default 5 minutes while a broker is away.
            "message.timeout.ms": 30_000,
            **config,
            "logger": _client_logger("producer"),
        }
        self._producer: Producer = Producer(settings)
        self.sent = 0
        self._closed = threading.Event()
        self._poller = threading.Thread(
            target=self._serve, name="flowcraft-kafka-producer", daemon=True
        )
        self._poller.start()

    def _serve(self) -> None:
        """Serve delivery reports until closed (they run the callbacks below)."""
        while not self._closed.is_set():
            self._producer.poll(0.05)

    async def send(
        self,
        topic: str,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> tuple[int, int]:
        """Produce one message (no key: jobs spread over the partitions) and wait for
        its delivery report. Returns its partition and offset."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[int, int]] = loop.create_future()

        def report(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                loop.call_soon_threadsafe(_fail, done, _kafka_error(error))
            else:
                where = (message.partition() or 0, message.offset() or 0)
                loop.call_soon_threadsafe(_succeed, done, where)

        while True:
            try:
                self._producer.produce(
                    topic, value=value, headers=list(headers or ()), on_delivery=report
                )
                break
            except BufferError:
                await asyncio.sleep(0.01)  # the local queue is full: let it drain
        self.sent += 1
        return await done

    async def aclose(self, flush_seconds: float = 10.0) -> None:
        """Deliver what is queued (up to ``flush_seconds``), then stop."""
        await asyncio.to_thread(self._producer.flush, flush_seconds)
        self._closed.set()
        await asyncio.to_thread(self._poller.join, 5.0)


def _succeed(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _kafka_error(error: KafkaError) -> Exception:
    from confluent_kafka import KafkaException

    return KafkaException(error)


@dataclass(eq=False, slots=True)
class KafkaJob:
    """A received message, as the adapter hands it around."""

    topic: str
    partition: int
    offset: int
    value: bytes
    headers: dict[str, bytes]
    epoch: int
    """The assignment it came from: an ack after the partition moved is ignored."""
    not_before: float = 0.0
    """Epoch seconds before which it must not run (a released copy)."""
    deliveries: int | None = None
    """How many times the group received this offset (counted in Redis)."""

    @property
    def where(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


@dataclass(slots=True)
class _Partition:
    """Offsets of one assigned partition that are received but not done."""

    epoch: int
    open: set[int] = field(default_factory=set)
    next_offset: int | None = None
    stored: tuple[int, str] = (-1, "")
    skip: set[int] = field(default_factory=set)
    """Offsets a previous owner finished past its commit (from the commit's metadata)."""

    def committable(self) -> int | None:
        """The offset to commit: the first unfinished one, else one past the last."""
        if self.open:
            return min(self.open)
        return self.next_offset

    def metadata(self) -> str:
        """The offsets done past the committable one, as ranges relative to it: the
        next owner skips them, so a crash redelivers only the unfinished jobs."""
        if not self.open or self.next_offset is None:
            return ""
        pending = sorted(self.open)
        base = pending[0]
        ranges: list[str] = []
        bounds = [*pending, self.next_offset]
        for low, high in itertools.pairwise(bounds):
            if high - low > 1:  # low+1 .. high-1 are done
                a, b = low + 1 - base, high - 1 - base
                ranges.append(str(a) if a == b else f"{a}-{b}")
        text = _METADATA_TAG + ",".join(ranges) if ranges else ""
        if len(text) > _METADATA_LIMIT:  # the broker's offset.metadata.max.bytes: drop the tail
            text = text[: text.rfind(",", 0, _METADATA_LIMIT)]
        return text


_METADATA_TAG = "fc1:"
_METADATA_LIMIT = 3000


def _skipped(committed: int, metadata: str | None) -> set[int]:
    """The absolute offsets a commit's metadata says are done (nothing if unreadable)."""
    if not metadata or not metadata.startswith(_METADATA_TAG) or committed < 0:
        return set()
    done: set[int] = set()
    try:
        for part in metadata[len(_METADATA_TAG) :].split(","):
            low, _, high = part.partition("-")
            a = int(low)
            b = int(high) if high else a
            if a < 1 or b < a or b - a > 1_000_000:
                return set()
            done.update(range(committed + a, committed + b + 1))
    except ValueError:
        return set()
    return done


class JobConsumer:
    """A consumer-group member for one topic (see the module docstring)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str,
        *,
        group_id: str,
        poll_seconds: float = 0.5,
        commit_interval_ms: int = 500,
    ) -> None:
        from confluent_kafka import Consumer

        settings = {
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "auto.commit.interval.ms": commit_interval_ms,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 10_000,
            "heartbeat.interval.ms": 1_000,
            "max.poll.interval.ms": 300_000,
            **config,
            "logger": _client_logger("consumer"),
        }
        self.topic = topic
        self.poll_seconds = poll_seconds
        self._consumer: Consumer = Consumer(settings)
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="flowcraft-kafka-consumer"
        )
        self._lock = threading.Lock()
        self._partitions: dict[int, _Partition] = {}
        self._epochs = itertools.count(1)
        self._paused = False
        self._resume_all = False
        self._last_poll = time.monotonic()
        self._deferred: list[tuple[float, int, KafkaJob]] = []
        self._tiebreak = itertools.count()
        self._keepalive: asyncio.Task[None] | None = None
        self._closed = False
        self.polls = 0
        self.commits = 0
        self._subscribed = False

    # ------------------------------------------------------------ in the consumer thread

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _subscribe(self) -> None:
        if not self._subscribed:
            self._consumer.subscribe(
                [self.topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._subscribed = True

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            committed = {
                tp.partition: _skipped(tp.offset, tp.metadata)
                for tp in consumer.committed(partitions, timeout=10)
            }
        except Exception as exc:  # then finished jobs past the commit run again
            logger.info("reading committed offsets failed: %r", exc)
            committed = {}
        with self._lock:
            for tp in partitions:
                state = _Partition(next(self._epochs))
                state.skip = committed.get(tp.partition, set())
                self._partitions[tp.partition] = state
        logger.info("assigned %s", sorted(tp.partition for tp in partitions))
        if self._paused:
            consumer.pause(partitions)
        else:  # see _unpause: the next poll resumes the whole assignment
            self._resume_all = True

    def _unpause(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Resume partitions that are leaving this member. librdkafka keeps a pause on
        the partition itself, beyond its assignment: one paused by the keep-alive,
        revoked or lost, and assigned to this member again later came back paused and
        was never fetched again (its jobs stranded; seen when Kafka restarted)."""
        try:
            consumer.resume(partitions)
        except Exception as exc:
            logger.debug("resuming partitions that leave failed: %r", exc)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done of the revoked partitions, then forget them."""
        from confluent_kafka import TopicPartition

        self._unpause(consumer, partitions)
        offsets = []
        with self._lock:
            for tp in partitions:
                state = self._partitions.pop(tp.partition, None)
                at = state.committable() if state is not None else None
                if state is not None and at is not None:
                    offsets.append(
                        TopicPartition(self.topic, tp.partition, at, metadata=state.metadata())
                    )
            self._drop_deferred({tp.partition for tp in partitions})
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
                self.commits += 1
            except Exception as exc:
                logger.warning("commit on revoke failed (%r): those jobs come again", exc)
        logger.info("revoked %s", sorted(tp.partition for tp in partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another member owns them now: commit nothing, forget them."""
        self._unpause(consumer, partitions)
        with self._lock:
            for tp in partitions:
                self._partitions.pop(tp.partition, None)
            self._drop_deferred({tp.partition for tp in partitions})
        logger.warning("lost %s", sorted(tp.partition for tp in partitions))

    def _drop_deferred(self, partitions: set[int]) -> None:
        self._deferred = [d for d in self._deferred if d[2].partition not in partitions]
        heapq.heapify(self._deferred)

    def _poll_sync(self, max_messages: int, timeout: float) -> list[KafkaJob]:
        self._subscribe()
        if self._paused or self._resume_all:
            # Also after an assignment made while not paused: a partition this member
            # paused once may come back paused (see _unpause); resuming is idempotent.
            self._consumer.resume(self._consumer.assignment())
            self._paused = self._resume_all = False
        jobs: list[KafkaJob] = []
        wait = timeout
        while len(jobs) < max_messages:
            message = self._consumer.poll(wait)
            self.polls += 1
            wait = 0
            if message is None:
                break
            job = self._take(message)
            if job is not None:
                jobs.append(job)
        self._last_poll = time.monotonic()
        return jobs

    def _take(self, message: Message) -> KafkaJob | None:
        error = message.error()
        if error is not None:
            logger.warning("consumer error: %s", error)
            return None
        partition = message.partition() or 0
        offset = message.offset() or 0
        with self._lock:
            state = self._partitions.get(partition)
            if state is None:  # not ours any more
                return None
            if state.next_offset is None or offset >= state.next_offset:
                state.next_offset = offset + 1
            if offset in state.skip:  # finished by the previous owner
                state.skip.discard(offset)
                return None
            state.open.add(offset)
            epoch = state.epoch
        headers = headers_of(message)
        not_before = 0.0
        raw = headers.get(HEADER_NOT_BEFORE)
        if raw:
            try:
                not_before = int(raw) / 1000
            except ValueError:
                not_before = 0.0
        return KafkaJob(
            self.topic, partition, offset, _bytes(message.value()), headers, epoch, not_before
        )

    def _keep_alive_sync(self) -> None:
        """Poll with the assignment paused (nothing is fetched), to stay in the group."""
        from confluent_kafka import TopicPartition

        self._subscribe()
        assignment = self._consumer.assignment()
        if not self._paused:
            self._consumer.pause(assignment)
            self._paused = True
        message = self._consumer.poll(0)
        self.polls += 1
        if message is not None and message.error() is None:
            # Fetched before the pause took effect: read it again after the resume.
            self._consumer.seek(
                TopicPartition(
                    message.topic() or self.topic, message.partition() or 0, message.offset() or 0
                )
            )
        self._last_poll = time.monotonic()

    def _store_sync(self, offsets: list[TopicPartition]) -> None:
        try:
            self._consumer.store_offsets(offsets=offsets)
        except Exception as exc:  # the partition moved meanwhile
            logger.debug("storing offsets failed: %r", exc)

    # ------------------------------------------------------------ asyncio side

    async def receive(self, max_messages: int) -> list[KafkaJob]:
        """Up to ``max_messages`` jobs: released copies whose time has come first, then
        new messages (waiting at most ``poll_seconds``). Copies that arrive early are
        held here until their time."""
        if self._keepalive is None:
            self._keepalive = asyncio.ensure_future(self._keep_alive())
        now = time.time()
        jobs: list[KafkaJob] = []
        with self._lock:  # rebalance callbacks drop held copies from the consumer thread
            while self._deferred and self._deferred[0][0] <= now and len(jobs) < max_messages:
                jobs.append(heapq.heappop(self._deferred)[2])
            next_due = self._deferred[0][0] if self._deferred else None
        if len(jobs) == max_messages:
            return jobs
        wait = 0.0 if jobs else self.poll_seconds
        if next_due is not None:
            wait = min(wait, max(0.0, next_due - now))
        for job in await self._call(self._poll_sync, max_messages - len(jobs), wait):
            if job.not_before > time.time():
                self.hold(job, job.not_before)
            else:
                jobs.append(job)
        return jobs

    def hold(self, job: KafkaJob, not_before: float) -> None:
        """Hand ``job`` out again from :meth:`receive` at ``not_before`` (epoch s)."""
        job.not_before = not_before
        with self._lock:
            heapq.heappush(self._deferred, (not_before, next(self._tiebreak), job))

    async def done(self, jobs: Sequence[KafkaJob]) -> None:
        """These jobs are finished: store each partition's first unfinished offset, with
        the offsets done past it as metadata (the background auto-commit sends it)."""
        from confluent_kafka import TopicPartition

        offsets = []
        with self._lock:
            touched: set[int] = set()
            for job in jobs:
                state = self._partitions.get(job.partition)
                if state is None or state.epoch != job.epoch:
                    continue  # revoked since: its new owner runs it again
                state.open.discard(job.offset)
                touched.add(job.partition)
            for partition in touched:
                state = self._partitions[partition]
                at = state.committable()
                if at is None:
                    continue
                stored = (at, state.metadata())
                if stored != state.stored:
                    state.stored = stored
                    offsets.append(TopicPartition(self.topic, partition, at, metadata=stored[1]))
        if offsets:
            await self._call(self._store_sync, offsets)

    async def _keep_alive(self) -> None:
        while not self._closed:
            await asyncio.sleep(_KEEPALIVE_SECONDS / 2)
            if time.monotonic() - self._last_poll < _KEEPALIVE_SECONDS:
                continue
            try:
                await self._call(self._keep_alive_sync)
            except Exception as exc:
                logger.warning("consumer keep-alive poll failed: %r", exc)

    def in_hand(self) -> int:
        """Messages received and not done (held copies included)."""
        with self._lock:
            return sum(len(p.open) for p in self._partitions.values())

    async def aclose(self) -> None:
        """Commit what is done and leave the group (its partitions move at once)."""
        self._closed = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
        await self._call(self._close_sync)
        self._thread.shutdown(wait=True)

    def _close_sync(self) -> None:
        from confluent_kafka import TopicPartition

        offsets = []
        with self._lock:
            for partition, state in self._partitions.items():
                at = state.committable()
                if at is not None:
                    offsets.append(
                        TopicPartition(self.topic, partition, at, metadata=state.metadata())
                    )
        if offsets:
            self._store_sync(offsets)
        self._consumer.close()  # commits the stored offsets, leaves the group


def headers_of(message: Message) -> dict[str, bytes]:
    raw: Any = message.headers() or []
    items = raw.items() if isinstance(raw, dict) else raw
    return {str(key): _bytes(value) for key, value in items}


def _bytes(value: str | bytes | None) -> bytes:
    if value is None:
        return b""
    return value.encode() if isinstance(value, str) else bytes(value)


def read_topic(
    config: Mapping[str, Any],
    topic: str,
    limit: int,
    timeout: float = 10.0,
    key: Callable[[Any], str] | None = None,
) -> list[Any]:
    """Up to ``limit`` messages of ``topic`` from the beginning, without a group
    (blocking: call it in a thread). For dead letters and tests. With ``key``, a
    message whose key an earlier one had is left out and does not count toward
    ``limit``."""
    import uuid

    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            **config,
            "group.id": f"flowcraft-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "logger": _client_logger("reader"),
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = sorted((metadata.topics[topic].partitions or {}).keys())
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        found: list[Any] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        positions: dict[int, int] = {}
        while len(found) < limit and time.monotonic() < deadline:
            if all(positions.get(p, -1) + 1 >= end for p, end in ends.items()):
                break
            message = consumer.poll(0.2)
            if message is None or message.error() is not None:
                continue
            positions[message.partition() or 0] = message.offset() or 0
            if key is not None:
                name = key(message)
                if name in seen:
                    continue
                seen.add(name)
            found.append(message)
        return found
    finally:
        consumer.close()
