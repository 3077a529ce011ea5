"""``SqsAdapter``: node jobs on SQS, run state and coordination in DynamoDB.

The base class runs all orchestration; this module writes the primitives:

* ``process_jobs``: long-polls the queue in batches (up to ``concurrency`` jobs in
  hand), keeps each message invisible while its job runs (a visibility
  heartbeat), deletes a message only after its handler returned (batched
  ``DeleteMessageBatch``), and on failure either hands it back after a delay
  (``ChangeMessageVisibility``) or moves it to the dead-letter queue.
* ``enqueue_job``: one ``SendMessage`` (FIFO queues: ``MessageGroupId`` per run,
  a ``MessageDeduplicationId`` per send so retried sends are not duplicated);
  ``enqueue_jobs`` (a fan-out's successors) sends ``SendMessageBatch`` requests.
* ``create_context``: a :class:`~flowcraft_sqs.DynamoDbContext` (one item per run).
* ``publish_final_result``: a conditional ``PutItem`` of the result item, which
  ``get_final_result`` (and so ``wait_for_result``) reads first.

``retry_mode="queue"`` runs one attempt per delivery: the attempt number is
SQS's ``ApproximateReceiveCount`` and a failed attempt comes back after a
visibility-timeout backoff. The queue's redrive policy moves messages that were
received too often (exhausted, or bouncing between incompatible workers) to the
dead-letter queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowcraft.blueprint import NodeDefinition
from flowcraft.distributed.adapter import (
    BaseDistributedAdapter,
    FinalResult,
    JobHandler,
    RetryJob,
    job_disposition,
)
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import FlowcraftError, NodeExecutionError, StateLimitError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer
from flowcraft_sqs._client import (
    AwsClients,
    AwsSettings,
    error_code,
)
from flowcraft_sqs._setup import ACTIVE_RUNS_INDEX
from flowcraft_sqs.context import DEFAULT_MAX_STATE_BYTES, DynamoDbContext, RunTable
from flowcraft_sqs.coordination import DynamoDbCoordinationStore

__all__ = ["DeadLetter", "SqsAdapter"]

RetryMode = Literal["in-process", "queue"]
MessageGroup = Literal["run", "node"]

MAX_VISIBILITY_SECONDS = 12 * 3600  # SQS's ceiling for ChangeMessageVisibility
_BATCH = 10  # SQS's batch size for receive, send, delete and visibility changes
_BATCH_BYTES = 200 * 1024  # below SQS's limit on a batch's total payload
_GROUP_ID = re.compile(r"[!-~]{1,128}")
_ERROR_ATTRIBUTE = "flowcraft-error"
_MAX_ATTEMPTS_ATTRIBUTE = "flowcraft-max-attempts"
_RETRY_DELAY_ATTRIBUTE = "flowcraft-retry-delay-ms"
_BACKOFF_ATTRIBUTE = "flowcraft-backoff"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message in the dead-letter queue and why it is there."""

    message_id: str
    body: str
    error: str
    """Our reason (empty if SQS's redrive moved it: it was received too often)."""
    receive_count: int


@dataclass(slots=True)
class _Poll:
    """One long poll that ``stop()`` may abandon: whoever takes the lock first decides
    whether the messages go to the worker or straight back to the queue."""

    lock: threading.Lock
    taken: bool = False
    abandoned: bool = False


class SqsAdapter(BaseDistributedAdapter):
    """A flowcraft worker (and operator client) on SQS and DynamoDB.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        queue_url: the job queue (a URL ending in ``.fifo`` is a FIFO queue).
        table_name: the DynamoDB table of run state, results (and coordination keys,
            unless ``coordination_store`` or ``coordination_table_name`` says otherwise).
        dead_letter_queue_url: where bad jobs go; default: the queue's redrive target.
        aws / clients: settings to create clients from (owned, closed by
            :meth:`aclose`), or shared :class:`AwsClients`.
        coordination_store: any ``CoordinationStore``; default a
            :class:`DynamoDbCoordinationStore` on ``coordination_table_name``.
        namespace: keeps apps sharing one table apart.
        retry_mode: ``"in-process"`` (the worker retries a node) or ``"queue"`` (one
            attempt per delivery; SQS redelivers after a backoff).
        concurrency: jobs in hand at once.
        wait_time_seconds: long-poll wait (0-20).
        visibility_timeout: seconds a received message stays hidden; renewed every
            third of it while its job runs.
        retry_delay_seconds: delay before a job handed back for other reasons
            (version mismatch, store errors) is delivered again.
        max_backoff_seconds: ceiling of queue-mode retry backoff.
        message_group: FIFO only: ``"run"`` (one group per run, the default) or
            ``"node"`` (one per run and node: more parallelism, no per-run order).
        max_state_bytes: bytes of context one run may hold (under the 400 KB item limit).
        index_shards: partitions of the active-runs index (spread index writes).
        reconcile_interval_seconds: run the reconciler in the worker this often
            (one worker per interval does it); ``None``: off.
        stalled_after_seconds: a run without a state change for this long is stalled.
        ack_batch_window: seconds to gather deletes into one ``DeleteMessageBatch``.
        event_bus, key_prefix, state_ttl_seconds, lease_seconds,
            dedupe_window_seconds, worker_id: see ``BaseDistributedAdapter``.
    """

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        queue_url: str,
        table_name: str = "flowcraft",
        dead_letter_queue_url: str | None = None,
        aws: AwsSettings | None = None,
        clients: AwsClients | None = None,
        coordination_store: CoordinationStore | None = None,
        coordination_table_name: str | None = None,
        namespace: str = "flowcraft",
        retry_mode: RetryMode = "in-process",
        concurrency: int = 10,
        wait_time_seconds: int = 20,
        visibility_timeout: int = 30,
        retry_delay_seconds: float = 1.0,
        max_backoff_seconds: float = 900.0,
        message_group: MessageGroup = "run",
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        index_shards: int = 4,
        reconcile_interval_seconds: float | None = None,
        stalled_after_seconds: float = 300.0,
        ack_batch_window: float = 0.02,
        event_bus: EventBus | None = None,
        **options: Any,
    ) -> None:
        if clients is not None and aws is not None:
            raise ValueError("pass clients= or aws=, not both")
        if retry_mode not in ("in-process", "queue"):
            raise ValueError(f"retry_mode must be 'in-process' or 'queue', not {retry_mode!r}")
        if message_group not in ("run", "node"):
            raise ValueError(f"message_group must be 'run' or 'node', not {message_group!r}")
        if not 0 <= wait_time_seconds <= 20:
            raise ValueError("wait_time_seconds must be 0..20 (SQS's long-poll limit)")
        if not 1 <= visibility_timeout <= MAX_VISIBILITY_SECONDS:
            raise ValueError("visibility_timeout must be 1..43200 seconds")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._owns_clients = clients is None
        self.clients = clients if clients is not None else AwsClients(aws)
        self._owns_store = coordination_store is None
        if coordination_store is None:
            coordination_store = DynamoDbCoordinationStore(
                coordination_table_name or table_name, clients=self.clients, namespace=namespace
            )
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=coordination_store,
            event_bus=event_bus,
            **options,
        )
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")
        self.retry_mode: RetryMode = retry_mode
        self.concurrency = concurrency
        self.wait_time_seconds = wait_time_seconds
        self.visibility_timeout = visibility_timeout
        self.retry_delay_seconds = retry_delay_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.message_group: MessageGroup = message_group
        self.reconcile_interval_seconds = reconcile_interval_seconds
        self.stalled_after_seconds = stalled_after_seconds
        self.ack_batch_window = ack_batch_window
        self.runs = RunTable(
            self.clients,
            table_name,
            namespace,
            state_ttl_seconds=self.state_ttl_seconds,
            max_state_bytes=max_state_bytes,
            index_shards=index_shards,
            serializer=runtime_options.serializer or JsonSerializer(),
        )
        self._dead_letter_url = dead_letter_queue_url
        self._dead_letter_resolved = dead_letter_queue_url is not None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_hand: dict[str, float] = {}  # receipt handle -> last made invisible
        self._visibility = asyncio.Lock()
        self._acks: _Acker | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue_url={self.queue_url!r}, worker_id={self.worker_id!r})"

    # ------------------------------------------------------------ the four primitives

    def create_context(self, run_id: str) -> DynamoDbContext:
        return self.runs.context(run_id)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self.clients.sqs_call(
            "send_message", QueueUrl=self.queue_url, **self._job_message(job)
        )

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """``SendMessageBatch``: up to 10 messages (and 200 KiB) a request. An entry SQS
        refuses alone (throttled, an internal error) is sent again by itself."""
        messages = [self._job_message(job) for job in jobs]
        for chunk in _batches(messages):
            entries = [{"Id": str(i), **message} for i, message in enumerate(chunk)]
            reply = await self.clients.sqs_call(
                "send_message_batch", QueueUrl=self.queue_url, Entries=entries
            )
            for failure in reply.get("Failed") or []:
                message = chunk[int(failure["Id"])]
                await self.clients.sqs_call("send_message", QueueUrl=self.queue_url, **message)

    async def send_body(
        self,
        body: str,
        *,
        group_id: str = "flowcraft",
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """Put a message body on the job queue as it is (tools and tests may send raw
        bodies). ``group_id`` matters for FIFO queues only."""
        message = self._message(body, group_id, attributes)
        await self.clients.sqs_call("send_message", QueueUrl=self.queue_url, **message)

    def _job_message(self, job: JobPayload) -> dict[str, Any]:
        attributes: dict[str, Any] = {}
        node = self.node_for(job)
        options = self.get_queue_retry_options(node) if node is not None else None
        if options:
            attributes = {
                _MAX_ATTEMPTS_ATTRIBUTE: _number(options["maxAttempts"]),
                _RETRY_DELAY_ATTRIBUTE: _number(options["retryDelayMs"]),
                _BACKOFF_ATTRIBUTE: _string(options["backoff"]),
            }
        group = job.run_id if self.message_group == "run" else f"{job.run_id}:{job.node_id}"
        return self._message(job.encode().decode(), group, attributes)

    def _message(
        self, body: str, group_id: str, attributes: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        """A message's parameters, as ``SendMessage`` and a batch entry take them."""
        message: dict[str, Any] = {"MessageBody": body}
        if attributes:
            message["MessageAttributes"] = dict(attributes)
        if self.fifo:
            message["MessageGroupId"] = _group_id(group_id)
            # One id per send: botocore's retries of this request are deduplicated,
            # later enqueues of the same node (loops, re-drives) are not.
            message["MessageDeduplicationId"] = uuid.uuid4().hex
        return message

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Write the run's result item, keeping the FIRST result published (a repeat,
        after a crash or from a racing duplicate, changes nothing): one ``UpdateItem``."""
        stored = {"status": result.status, "errors": result.errors, "context": result.context}
        await self.runs.write_result(run_id, stored)

    async def get_final_result(self, run_id: str) -> FinalResult | None:
        """The published result: one ``GetItem`` of the run's result item."""
        data = await self.runs.read_result(run_id)
        if data is None:
            return None
        return FinalResult(run_id, data["status"], data["context"], data.get("errors", []))

    # ------------------------------------------------------------ queue-native retries

    def should_retry_in_process(self, node_def: NodeDefinition) -> bool:
        return self.retry_mode == "in-process"

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        """In queue mode: attempts and backoff, carried as message attributes."""
        if self.should_retry_in_process(node_def):
            return None
        config = node_def.config
        return {
            "maxAttempts": node_def.max_attempts,
            "retryDelayMs": config.retry_delay if config else 0,
            "backoff": config.retry_backoff if config else "exponential",
        }

    # ------------------------------------------------------------ consuming

    async def stop(self) -> None:
        """No new jobs; ``process_jobs`` returns once the jobs in hand are done."""
        await super().stop()
        self._wake.set()

    async def aclose(self) -> None:
        """Stop, wait for the jobs in hand, and close what this adapter created."""
        await self.stop()
        await self._idle.wait()
        if self._owns_store and isinstance(self.coordination_store, DynamoDbCoordinationStore):
            await self.coordination_store.aclose()
        if self._owns_clients:
            self.clients.close()

    async def process_jobs(self, handler: JobHandler) -> None:
        self._wake.clear()
        self._idle.clear()
        self._acks = _Acker(self)
        tasks: set[asyncio.Task[None]] = set()
        slot_free = asyncio.Event()
        background = [asyncio.ensure_future(self._heartbeat_loop())]
        if self.reconcile_interval_seconds:
            background.append(asyncio.ensure_future(self._reconciler_loop()))

        def finished(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            slot_free.set()

        try:
            while not self.stopping:
                free = self.concurrency - len(tasks)
                if free <= 0:
                    slot_free.clear()
                    await _first(slot_free.wait(), self._wake.wait())
                    continue
                try:
                    messages = await self._receive(min(_BATCH, free))
                except Exception as exc:
                    self.logger.warning("receiving from %s failed: %s", self.queue_url, exc)
                    await _first(asyncio.sleep(1.0), self._wake.wait())
                    continue
                for message in messages:
                    task = asyncio.ensure_future(self._deliver(handler, message))
                    tasks.add(task)
                    task.add_done_callback(finished)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._acks.flush()
            self._idle.set()

    async def _receive(self, max_messages: int) -> list[dict[str, Any]]:
        """One long poll, abandoned (its messages handed straight back) if ``stop()``
        comes first, so a worker stops without waiting out the poll."""
        poll = _Poll(threading.Lock())
        receive = asyncio.ensure_future(
            self.clients.run(functools.partial(self._receive_sync, poll, max_messages))
        )
        waker = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({receive, waker}, return_when=asyncio.FIRST_COMPLETED)
        waker.cancel()
        if not receive.done():
            with poll.lock:
                poll.abandoned = not poll.taken
            if poll.abandoned:
                receive.add_done_callback(_retrieve)
                return []
        messages: list[dict[str, Any]] = await receive
        if messages and self.stopping:
            await self.clients.run(functools.partial(self._release_sync, messages))
            return []
        return messages

    def _receive_sync(self, poll: _Poll, max_messages: int) -> list[dict[str, Any]]:
        response = self.clients.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=self.wait_time_seconds,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
            MessageAttributeNames=["All"],
        )
        messages: list[dict[str, Any]] = response.get("Messages", [])
        with poll.lock:
            if not poll.abandoned:
                poll.taken = True
                return messages
        if messages:
            self._release_sync(messages)
        return []

    def _release_sync(self, messages: list[dict[str, Any]]) -> None:
        """Make messages visible again at once (received while stopping)."""
        for start in range(0, len(messages), _BATCH):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(messages[start : start + _BATCH])
            ]
            try:
                self.clients.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url, Entries=entries
                )
            except Exception as exc:
                self.logger.warning("could not release %d messages: %s", len(entries), exc)

    async def _deliver(self, handler: JobHandler, message: dict[str, Any]) -> None:
        receipt = message["ReceiptHandle"]
        self._in_hand[receipt] = time.monotonic()
        job: JobPayload | None = None
        try:
            job = self._decode(message)
            await handler(job)
        except asyncio.CancelledError:
            # The worker is being torn down: SQS delivers the message again after
            # its visibility timeout.
            self._in_hand.pop(receipt, None)
            raise
        except Exception as exc:
            self._in_hand.pop(receipt, None)
            try:
                await self._settle_failure(message, job, exc)
            except Exception as settle_exc:
                self.logger.warning(
                    "message %s: could not settle after %r: %s; SQS redelivers it",
                    message.get("MessageId"),
                    exc,
                    settle_exc,
                )
            return
        self._in_hand.pop(receipt, None)
        assert self._acks is not None
        await self._acks.delete(receipt)

    def _decode(self, message: Mapping[str, Any]) -> JobPayload:
        job = JobPayload.decode(message["Body"])
        if self.retry_mode != "queue":
            return job
        attempt = _receive_count(message)
        attempts = self._max_attempts(job, message)
        return job.model_copy(update={"attempt": attempt, "is_last_attempt": attempt >= attempts})

    def _max_attempts(self, job: JobPayload, message: Mapping[str, Any]) -> int:
        carried = message.get("MessageAttributes", {}).get(_MAX_ATTEMPTS_ATTRIBUTE)
        if carried is not None:
            return int(carried["StringValue"])
        node = self.node_for(job)
        return node.max_attempts if node is not None else 1

    async def _settle_failure(
        self, message: Mapping[str, Any], job: JobPayload | None, exc: Exception
    ) -> None:
        # A commit that can never fit in the item will not fit on redelivery either.
        disposition = "dead-letter" if isinstance(exc, StateLimitError) else job_disposition(exc)
        if disposition == "dead-letter":
            self.logger.warning("dead-lettering message %s: %s", message.get("MessageId"), exc)
            await self._dead_letter(message, exc)
            return
        delay = self._retry_delay(message, job, exc)
        self.logger.debug("message %s back in %d s: %s", message.get("MessageId"), delay, exc)
        async with self._visibility:
            await self.clients.sqs_call(
                "change_message_visibility",
                QueueUrl=self.queue_url,
                ReceiptHandle=message["ReceiptHandle"],
                VisibilityTimeout=delay,
            )

    def _retry_delay(
        self, message: Mapping[str, Any], job: JobPayload | None, exc: Exception
    ) -> int:
        """Seconds until SQS delivers a handed-back message again."""
        if (
            self.retry_mode == "queue"
            and isinstance(exc, RetryJob)
            and isinstance(exc.__cause__, NodeExecutionError)
            and job is not None
        ):
            seconds = self._backoff(message, job)
        elif isinstance(exc, RetryJob):
            seconds = exc.delay_seconds
        else:
            seconds = self.retry_delay_seconds
        return max(0, min(math.ceil(seconds), MAX_VISIBILITY_SECONDS))

    def _backoff(self, message: Mapping[str, Any], job: JobPayload) -> float:
        """Queue-mode backoff after failed attempt n: the node's ``retry_delay``, doubled
        per attempt when exponential (capped at 64 times, as in process)."""
        carried = message.get("MessageAttributes", {})
        if _RETRY_DELAY_ATTRIBUTE in carried:
            delay = float(carried[_RETRY_DELAY_ATTRIBUTE]["StringValue"]) / 1000
            kind = carried.get(_BACKOFF_ATTRIBUTE, {}).get("StringValue", "exponential")
        else:
            node = self.node_for(job)
            config = node.config if node is not None else None
            delay = (config.retry_delay if config else 0) / 1000
            kind = config.retry_backoff if config else "exponential"
        if kind == "fixed":
            return min(delay, self.max_backoff_seconds)
        attempt = _receive_count(message)
        return min(delay * 2.0 ** (attempt - 1), delay * 64, self.max_backoff_seconds)

    # ------------------------------------------------------------ dead letters

    async def _dead_letter(self, message: Mapping[str, Any], exc: Exception) -> None:
        """Copy the message to the dead-letter queue with the reason, then delete it."""
        url = await self.dead_letter_queue_url()
        if url is None:
            self.logger.error(
                "no dead-letter queue for %s: dropping message %s (%s)",
                self.queue_url,
                message.get("MessageId"),
                exc,
            )
        else:
            params: dict[str, Any] = {
                "QueueUrl": url,
                "MessageBody": message["Body"],
                "MessageAttributes": {
                    _ERROR_ATTRIBUTE: _string(_clean(f"{type(exc).__name__}: {exc}")),
                    "flowcraft-source-message-id": _string(str(message.get("MessageId", "?"))),
                    "flowcraft-receive-count": _number(_receive_count(message)),
                },
            }
            if url.endswith(".fifo"):
                group = message.get("Attributes", {}).get("MessageGroupId", "flowcraft")
                params["MessageGroupId"] = group
                params["MessageDeduplicationId"] = str(message.get("MessageId", uuid.uuid4().hex))
            await self.clients.sqs_call("send_message", **params)
        assert self._acks is not None
        await self._acks.delete(message["ReceiptHandle"])

    async def dead_letter_queue_url(self) -> str | None:
        """The dead-letter queue: as given, else the job queue's redrive target."""
        if self._dead_letter_resolved:
            return self._dead_letter_url
        response = await self.clients.sqs_call(
            "get_queue_attributes", QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
        )
        policy = response.get("Attributes", {}).get("RedrivePolicy")
        if policy:
            arn = json.loads(policy)["deadLetterTargetArn"]
            *_, account, name = arn.split(":")
            found = await self.clients.sqs_call(
                "get_queue_url", QueueName=name, QueueOwnerAWSAccountId=account
            )
            self._dead_letter_url = found["QueueUrl"]
        self._dead_letter_resolved = True
        return self._dead_letter_url

    async def peek_dead_letters(self, max_messages: int = 100) -> list[DeadLetter]:
        """Look at dead-lettered messages without taking them (for operators and tests).

        Each receive makes the messages visible again at once, so this is a sample
        on real SQS (it may miss some, never removes any).
        """
        url = await self.dead_letter_queue_url()
        if url is None:
            return []
        found: dict[str, DeadLetter] = {}
        for _ in range(max(1, math.ceil(max_messages / _BATCH))):
            response = await self.clients.sqs_call(
                "receive_message",
                QueueUrl=url,
                MaxNumberOfMessages=_BATCH,
                VisibilityTimeout=0,
                WaitTimeSeconds=0,
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
                MessageAttributeNames=["All"],
            )
            new = 0
            for m in response.get("Messages", []):
                if m["MessageId"] in found:
                    continue
                new += 1
                error = m.get("MessageAttributes", {}).get(_ERROR_ATTRIBUTE, {})
                found[m["MessageId"]] = DeadLetter(
                    m["MessageId"], m["Body"], error.get("StringValue", ""), _receive_count(m)
                )
            if not new or len(found) >= max_messages:
                break
        return list(found.values())[:max_messages]

    # ------------------------------------------------------------ heartbeat

    async def _heartbeat_loop(self) -> None:
        """Every third of the visibility timeout, keep the messages in hand invisible."""
        period = max(1.0, self.visibility_timeout / 3)
        while True:
            await asyncio.sleep(period / 2)
            now = time.monotonic()
            due = [r for r, at in list(self._in_hand.items()) if now - at >= period]
            for start in range(0, len(due), _BATCH):
                chunk = due[start : start + _BATCH]
                entries = [
                    {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": self.visibility_timeout}
                    for i, r in enumerate(chunk)
                ]
                try:
                    async with self._visibility:
                        # Only messages still in hand: one that finished meanwhile
                        # must keep the delay its failure asked for.
                        entries = [e for e in entries if e["ReceiptHandle"] in self._in_hand]
                        if not entries:
                            continue
                        await self.clients.sqs_call(
                            "change_message_visibility_batch",
                            QueueUrl=self.queue_url,
                            Entries=entries,
                        )
                except Exception as exc:
                    self.logger.warning("visibility heartbeat failed: %s", exc)
                    continue
                for entry in entries:
                    if entry["ReceiptHandle"] in self._in_hand:
                        self._in_hand[entry["ReceiptHandle"]] = now

    # ------------------------------------------------------------ reconciler

    async def find_stalled_runs(
        self, older_than_seconds: float | None = None, *, limit: int = 1000
    ) -> list[str]:
        """Runs not ended (and not waiting for a resume) whose state has not changed for
        ``older_than_seconds`` (default ``stalled_after_seconds``): one ``Query`` per
        shard of the sparse active-runs index."""
        older = self.stalled_after_seconds if older_than_seconds is None else older_than_seconds
        cutoff = int((time.time() - older) * 1000)
        table = self.runs
        found: list[str] = []
        for shard in range(table.index_shards):
            params: dict[str, Any] = {
                "TableName": table.table_name,
                "IndexName": ACTIVE_RUNS_INDEX,
                "KeyConditionExpression": "#g = :g AND #u < :cutoff",
                "ExpressionAttributeNames": {"#g": "g", "#u": "u"},
                "ExpressionAttributeValues": {
                    ":g": {"S": table.index_partition(shard)},
                    ":cutoff": {"N": str(cutoff)},
                },
            }
            while len(found) < limit:
                try:
                    response = await self.clients.dynamodb_call("query", **params)
                except Exception as exc:
                    if error_code(exc) in ("ValidationException", "ResourceNotFoundException"):
                        raise FlowcraftError(
                            f"table {table.table_name!r} has no index {ACTIVE_RUNS_INDEX!r}: "
                            f"create it with flowcraft_sqs.create_table ({exc})"
                        ) from exc
                    raise
                for item in response.get("Items", []):
                    if item.get("st", {}).get("S") != "awaiting":
                        found.append(table.run_id_of(item))
                if "LastEvaluatedKey" not in response:
                    break
                params["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return found[:limit]

    async def reconcile_stalled(self, older_than_seconds: float | None = None) -> dict[str, int]:
        """``reconcile`` every stalled run; returns jobs enqueued per run."""
        enqueued: dict[str, int] = {}
        for run_id in await self.find_stalled_runs(older_than_seconds):
            try:
                enqueued[run_id] = await self.reconcile(run_id)
            except Exception as exc:
                self.logger.warning("reconciling run %s failed: %s", run_id, exc)
        if enqueued:
            self.logger.info("reconciled %d stalled runs", len(enqueued))
        return enqueued

    async def _reconciler_loop(self) -> None:
        interval = float(self.reconcile_interval_seconds or 60.0)
        claim = f"{self.key_prefix}reconciler:{self.runs.namespace}"
        while True:
            await asyncio.sleep(interval)
            try:
                # One worker of the fleet per interval.
                if await self.coordination_store.set_if_not_exist(
                    claim, self.worker_id, interval * 0.9
                ):
                    await self.reconcile_stalled()
            except Exception as exc:
                self.logger.warning("reconciler pass failed: %s", exc)


class _Acker:
    """Deletes handled messages in batches of up to ten; each caller waits for its own
    delete, so a job's task ends only after its message is gone."""

    def __init__(self, adapter: SqsAdapter) -> None:
        self._adapter = adapter
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def delete(self, receipt: str) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((receipt, done))
        if len(self._pending) >= _BATCH:
            self._send_now()
        elif self._timer is None:
            self._timer = loop.call_later(self._adapter.ack_batch_window, self._send_now)
        await done

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            task = asyncio.ensure_future(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        adapter = self._adapter
        entries = [{"Id": str(i), "ReceiptHandle": r} for i, (r, _) in enumerate(batch)]
        try:
            response = await adapter.clients.sqs_call(
                "delete_message_batch", QueueUrl=adapter.queue_url, Entries=entries
            )
            for failure in response.get("Failed", []):
                adapter.logger.warning(
                    "delete failed (%s): the message will be delivered again (harmless)",
                    failure.get("Code"),
                )
        except Exception as exc:
            adapter.logger.warning("deleting %d messages failed: %s", len(entries), exc)
        finally:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def flush(self) -> None:
        self._send_now()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


async def _first(*aws: Any) -> None:
    """Wait for the first of several awaitables; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Consume an abandoned poll's outcome so asyncio does not log it as unretrieved."""
    if not future.cancelled():
        future.exception()


def _receive_count(message: Mapping[str, Any]) -> int:
    return int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))


def _group_id(value: str) -> str:
    """A valid FIFO ``MessageGroupId`` (printable ASCII, <= 128): long or exotic ids are
    hashed."""
    if _GROUP_ID.fullmatch(value):
        return value
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _number(value: float) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": str(value)}


def _batches(messages: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """Messages in request-sized batches (count and total body size)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for message in messages:
        body = len(message["MessageBody"].encode())
        if batch and (len(batch) == _BATCH or size + body > _BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += body
    if batch:
        yield batch


_INVALID_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: str, limit: int = 4000) -> str:
    """Text SQS accepts in a message attribute (XML characters), shortened."""
    return _INVALID_XML.sub("?", text)[:limit] or "?"
