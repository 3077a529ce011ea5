"""``SqsAdapter``: node jobs on SQS, run state and coordination in DynamoDB.

The base classes run all orchestration and every delivery decision
(:class:`~flowcraft.distributed.PullingAdapter` receives, renews, settles and acks);
this module writes SQS's calls:

* ``receive``: one long poll (``ReceiveMessage``, up to 10 messages), abandoned
  with its messages handed straight back if the worker stops meanwhile.
* ``ack``: ``DeleteMessageBatch``; ``renew`` and ``release``:
  ``ChangeMessageVisibility``; ``dead_letter``: a copy with the reason on the
  dead-letter queue, then a delete.
* ``enqueue_job``: one ``SendMessage`` (FIFO queues: ``MessageGroupId`` per run,
  a ``MessageDeduplicationId`` per send so retried sends are not duplicated);
  ``enqueue_jobs`` (a fan-out's successors) sends ``SendMessageBatch`` requests.
* ``create_context``: a :class:`~flowcraft_sqs.DynamoDbContext` (one item per run).
* ``publish_final_result``: a conditional update of the result item, which
  ``read_final_result`` (and so ``wait_for_result``) reads.
* ``find_stalled_runs``: the reconciler's candidates, from a sparse index.

In ``retry_mode="queue"`` the base counts a node's failed attempts and releases the
message for the node's backoff; the queue's redrive policy still moves messages
received too often (bouncing between incompatible workers) to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from flowcraft.distributed import DeadLetter, FinalResult, PullingAdapter
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import FlowcraftError
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer
from flowcraft_sqs._client import AwsClients, AwsSettings, error_code
from flowcraft_sqs._messages import (
    BATCH,
    ERROR_ATTRIBUTE,
    MAX_DELAY_SECONDS,
    MAX_VISIBILITY_SECONDS,
    Poll,
    batches,
    clean,
    group_id,
    message_group,
    number_attribute,
    receive_count,
    retrieve,
    string_attribute,
)
from flowcraft_sqs._operations import Operations
from flowcraft_sqs._setup import ACTIVE_RUNS_INDEX
from flowcraft_sqs.context import DEFAULT_MAX_STATE_BYTES, DynamoDbContext, RunTable
from flowcraft_sqs.coordination import DynamoDbCoordinationStore

__all__ = ["SqsAdapter"]

DEFAULT_VISIBILITY_SECONDS = 4
"""A received message's invisibility (renewed while its job runs): with the lease, how
soon a killed worker's jobs are delivered again."""
DEFAULT_LEASE_SECONDS = 3.0
"""The activation lease (shorter than the visibility, so it has expired by the time a
killed worker's message reappears)."""

Message = dict[str, Any]
MessageGroup = Literal["run", "node"]


class SqsAdapter(Operations, PullingAdapter[Message]):
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
        wait_time_seconds: long-poll wait (0-20).
        visibility_timeout: seconds a received message stays hidden; renewed every
            third of it while its job runs (one ``ChangeMessageVisibility`` per
            running job every 1.3 s by default). With ``lease_seconds`` (default 3 s
            here) it decides how soon a dead worker's jobs run again: its messages
            reappear within ``visibility_timeout`` of its last renewal, when its
            leases have expired too; a long poll the dead worker left in flight may
            take them once more, for one more ``visibility_timeout``. Measured with
            the defaults on moto: the runs move again after a median 4.7 s, at most
            8.6 s after a SIGKILL (``tests-integration/tests/sqs/test_recovery.py``).
        max_backoff_seconds: ceiling of any delay before a released message returns.
        message_group: FIFO only: ``"run"`` (one group per run, the default) or
            ``"node"`` (one per run and node: more parallelism, no per-run order).
        max_state_bytes: bytes of context one run may hold (under the 400 KB item limit).
        index_shards: partitions of the active-runs index (spread index writes).
        **options: see :class:`~flowcraft.distributed.PullingAdapter` (``concurrency``,
            ``ack_batch_window``, ``max_deliveries``) and
            :class:`~flowcraft.distributed.BaseDistributedAdapter` (``retry_mode``,
            ``retry_delay_seconds``, ``reconcile_interval_seconds``,
            ``stalled_after_seconds``, ``lease_seconds``, ...).
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
        wait_time_seconds: int = 20,
        visibility_timeout: int = DEFAULT_VISIBILITY_SECONDS,
        max_backoff_seconds: float = 900.0,
        message_group: MessageGroup = "run",
        max_state_bytes: int = DEFAULT_MAX_STATE_BYTES,
        index_shards: int = 4,
        event_bus: EventBus | None = None,
        **options: Any,
    ) -> None:
        if clients is not None and aws is not None:
            raise ValueError("pass clients= or aws=, not both")
        if message_group not in ("run", "node"):
            raise ValueError(f"message_group must be 'run' or 'node', not {message_group!r}")
        if not 0 <= wait_time_seconds <= 20:
            raise ValueError("wait_time_seconds must be 0..20 (SQS's long-poll limit)")
        if not 1 <= visibility_timeout <= MAX_VISIBILITY_SECONDS:
            raise ValueError("visibility_timeout must be 1..43200 seconds")
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
            visibility_seconds=visibility_timeout,
            ack_batch_size=BATCH,
            **{"lease_seconds": DEFAULT_LEASE_SECONDS, **options},
        )
        self.queue_url = queue_url
        self.fifo = queue_url.endswith(".fifo")
        self.wait_time_seconds = wait_time_seconds
        self.visibility_timeout = visibility_timeout
        self.max_backoff_seconds = max_backoff_seconds
        self.max_delay_seconds = max_backoff_seconds  # what release() waits at most
        self.message_group: MessageGroup = message_group
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
        self._redrive: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue_url={self.queue_url!r}, worker_id={self.worker_id!r})"

    # ------------------------------------------------------------ the seed's primitives

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
        for chunk in batches(messages):
            entries = [{"Id": str(i), **message} for i, message in enumerate(chunk)]
            reply = await self.clients.sqs_call(
                "send_message_batch", QueueUrl=self.queue_url, Entries=entries
            )
            for failure in reply.get("Failed") or []:
                message = chunk[int(failure["Id"])]
                await self.clients.sqs_call("send_message", QueueUrl=self.queue_url, **message)

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Write the run's result item, keeping the FIRST result published (a repeat,
        after a crash or from a racing duplicate, changes nothing): one ``UpdateItem``."""
        stored = {"status": result.status, "errors": result.errors, "context": result.context}
        await self.runs.write_result(run_id, stored)

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        """The published result: one ``GetItem`` of the run's result item."""
        data = await self.runs.read_result(run_id)
        if data is None:
            return None
        return FinalResult(run_id, data["status"], data["context"], data.get("errors", []))

    async def enqueue_raw(self, body: bytes) -> None:
        # SQS bodies are text: bytes that are not UTF-8 go as their Latin-1 reading.
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text = body.decode("latin-1")
        await self.send_body(text)

    async def send_body(self, body: str, *, group_id: str = "flowcraft") -> None:
        """Put a message body on the job queue as it is (tools and tests may send raw
        bodies). ``group_id`` matters for FIFO queues only."""
        message = self._message(body, group_id)
        await self.clients.sqs_call("send_message", QueueUrl=self.queue_url, **message)

    def _job_message(self, job: JobPayload) -> dict[str, Any]:
        group = job.run_id if self.message_group == "run" else f"{job.run_id}:{job.node_id}"
        return self._message(job.encode().decode(), group)

    def _message(self, body: str, group: str) -> dict[str, Any]:
        """A message's parameters, as ``SendMessage`` and a batch entry take them."""
        message: dict[str, Any] = {"MessageBody": body}
        if self.fifo:
            message["MessageGroupId"] = group_id(group)
            # One id per send: botocore's retries of this request are deduplicated,
            # later enqueues of the same node (loops, re-drives) are not.
            message["MessageDeduplicationId"] = uuid.uuid4().hex
        return message

    # ------------------------------------------------------------ the queue's calls

    async def receive(self, max_messages: int) -> Sequence[Message]:
        """One long poll. Abandoned by a stopping worker, it hands its messages back:
        the polling thread does if it has not delivered them yet, else the loop does
        with what this returns."""
        poll = Poll(threading.Lock())
        receiving: asyncio.Future[list[Message]] = asyncio.ensure_future(
            self.clients.run(functools.partial(self._receive_sync, poll, min(BATCH, max_messages)))
        )
        try:
            return await asyncio.shield(receiving)
        except asyncio.CancelledError:
            with poll.lock:
                poll.abandoned = not poll.taken
            if poll.abandoned:
                receiving.add_done_callback(retrieve)
                raise
            return await receiving  # taken already: the loop releases them

    def _receive_sync(self, poll: Poll, max_messages: int) -> list[Message]:
        response = self.clients.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=self.wait_time_seconds,
            VisibilityTimeout=self.visibility_timeout,
            MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"],
        )
        messages: list[Message] = response.get("Messages", [])
        with poll.lock:
            if not poll.abandoned:
                poll.taken = True
                return messages
        if messages:
            self._release_sync(messages)
        return []

    def _release_sync(self, messages: list[Message]) -> None:
        """Make messages visible again at once (received while stopping)."""
        for start in range(0, len(messages), BATCH):
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(messages[start : start + BATCH])
            ]
            try:
                self.clients.sqs.change_message_visibility_batch(
                    QueueUrl=self.queue_url, Entries=entries
                )
            except Exception as exc:
                self.logger.warning("could not release %d messages: %s", len(entries), exc)

    def message_body(self, message: Message) -> str:
        body: str = message["Body"]
        return body

    def delivery_count(self, message: Message) -> int:
        return receive_count(message)

    async def ack(self, messages: Sequence[Message]) -> None:
        entries = [
            {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)
        ]
        response = await self.clients.sqs_call(
            "delete_message_batch", QueueUrl=self.queue_url, Entries=entries
        )
        for failure in response.get("Failed", []):
            self.logger.warning(
                "delete failed (%s): the message will be delivered again (harmless)",
                failure.get("Code"),
            )

    async def renew(self, message: Message, seconds: float) -> None:
        await self._change_visibility(message, seconds)

    async def release(self, message: Message, delay_seconds: float) -> None:
        await self._change_visibility(message, min(delay_seconds, self.max_backoff_seconds))

    async def _change_visibility(self, message: Message, seconds: float) -> None:
        await self.clients.sqs_call(
            "change_message_visibility",
            QueueUrl=self.queue_url,
            ReceiptHandle=message["ReceiptHandle"],
            VisibilityTimeout=max(0, min(math.ceil(seconds), MAX_VISIBILITY_SECONDS)),
        )

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Copy the message to the dead-letter queue with the reason, then delete it."""
        url = await self.dead_letter_queue_url()
        if url is None:
            self.logger.error(
                "no dead-letter queue for %s: dropping message %s (%s)",
                self.queue_url,
                message.get("MessageId"),
                reason,
            )
        else:
            params: dict[str, Any] = {
                "QueueUrl": url,
                "MessageBody": message["Body"],
                "MessageAttributes": {
                    ERROR_ATTRIBUTE: string_attribute(clean(reason)),
                    "flowcraft-source-message-id": string_attribute(
                        str(message.get("MessageId", "?"))
                    ),
                    "flowcraft-receive-count": number_attribute(receive_count(message)),
                },
            }
            if url.endswith(".fifo"):
                params["MessageGroupId"] = message_group(message)
                params["MessageDeduplicationId"] = str(message.get("MessageId", uuid.uuid4().hex))
            await self.clients.sqs_call("send_message", **params)
        await self.ack([message])

    # ------------------------------------------------------------ dead letters

    async def dead_letter_queue_url(self) -> str | None:
        """The dead-letter queue: as given, else the job queue's redrive target."""
        if self._dead_letter_resolved:
            return self._dead_letter_url
        policy = await self._redrive_policy()
        if "deadLetterTargetArn" in policy:
            *_, account, name = str(policy["deadLetterTargetArn"]).split(":")
            found = await self.clients.sqs_call(
                "get_queue_url", QueueName=name, QueueOwnerAWSAccountId=account
            )
            self._dead_letter_url = found["QueueUrl"]
        self._dead_letter_resolved = True
        return self._dead_letter_url

    async def _redrive_policy(self) -> dict[str, Any]:
        """The job queue's redrive policy (read once; {} when it has none)."""
        if self._redrive is None:
            response = await self.clients.sqs_call(
                "get_queue_attributes", QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"]
            )
            text = response.get("Attributes", {}).get("RedrivePolicy")
            self._redrive = json.loads(text) if text else {}
        return self._redrive

    async def redelivery_limit(self) -> int | None:
        """The redrive policy's ``maxReceiveCount``: SQS counts hand-backs as receives."""
        limit = (await self._redrive_policy()).get("maxReceiveCount")
        return int(limit) if limit is not None else self.max_deliveries

    async def resend(self, message: Message, delay_seconds: float) -> bool:
        """A fresh copy (receive count 0) due after the delay, then a delete."""
        params = self._message(message["Body"], message_group(message))
        if not self.fifo:  # FIFO queues delay whole queues only
            params["DelaySeconds"] = max(0, min(math.ceil(delay_seconds), MAX_DELAY_SECONDS))
        await self.clients.sqs_call("send_message", QueueUrl=self.queue_url, **params)
        await self.ack([message])
        return True

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Look at dead-lettered messages without taking them (for operators and tests).
        The reason is empty for a message SQS's redrive moved (received too often).

        Each receive makes the messages visible again at once, so this is a sample
        on real SQS (it may miss some, never removes any).
        """
        url = await self.dead_letter_queue_url()
        if url is None:
            return []
        found: dict[str, DeadLetter] = {}
        for _ in range(max(1, math.ceil(limit / BATCH))):
            response = await self.clients.sqs_call(
                "receive_message",
                QueueUrl=url,
                MaxNumberOfMessages=BATCH,
                VisibilityTimeout=0,
                WaitTimeSeconds=0,
                MessageAttributeNames=["All"],
            )
            new = 0
            for m in response.get("Messages", []):
                if m["MessageId"] in found:
                    continue
                new += 1
                error = m.get("MessageAttributes", {}).get(ERROR_ATTRIBUTE, {})
                found[m["MessageId"]] = DeadLetter(
                    m["Body"], error.get("StringValue", ""), m["MessageId"]
                )
            if not new or len(found) >= limit:
                break
        return list(found.values())[:limit]

    # ------------------------------------------------------------ reconciler

    async def find_stalled_runs(
        self, older_than_seconds: float | None = None, limit: int = 1000
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

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        if self._owns_store and isinstance(self.coordination_store, DynamoDbCoordinationStore):
            await self.coordination_store.aclose()
        if self._owns_clients:
            self.clients.close()
