"""``CloudflareAdapter``: jobs on Cloudflare Queues, runs in Durable Objects.

The base classes run all orchestration and the pull loop (``PullingAdapter``); this
module writes the primitives, each one call to the companion Worker
(``worker/worker.mjs``):

* ``create_context``: the run's ``FlowcraftRun`` object (context rows, coordination
  keys, the final result; see :mod:`flowcraft_cloudflare.context`).
* ``enqueue_job`` / ``enqueue_jobs``: one ``enqueue`` call (the Worker sends a batch
  to the Cloudflare Queue; its consumer files the messages in the inbox object).
* ``receive`` / ``renew`` / ``ack`` / ``release`` / ``dead_letter``: the inbox's
  pull, extend, ack, release and dead calls.
* ``publish_final_result``: insert-if-absent of the result in the run object, which
  answers ``wait_for_result``'s long poll on that object (no KV read anywhere: KV
  caches a miss for about a minute).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from flowcraft.blueprint import WorkflowBlueprint
from flowcraft.context import AsyncContext
from flowcraft.distributed import Admission
from flowcraft.distributed import keys as K
from flowcraft.distributed.adapter import FINAL_STATUSES, FinalResult
from flowcraft.distributed.delivery import DeadLetter
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft.distributed.results import ResultWatch
from flowcraft.events import EventBus
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import JsonSerializer, encode_value
from flowcraft_cloudflare._client import WorkerClient, WorkerError, WorkerSettings
from flowcraft_cloudflare.context import (
    MAX_VALUE_BYTES,
    DurableObjectContext,
    PendingOps,
    registry_object,
    run_object,
)
from flowcraft_cloudflare.coordination import DurableObjectCoordinationStore
from flowcraft_cloudflare.inbox import MAX_DELAY_SECONDS, Inbox, InboxMessage
from flowcraft_cloudflare.pull_consumer import PullConsumer, QueuesApiSettings

__all__ = ["DEFAULT_LEASE_SECONDS", "DEFAULT_VISIBILITY_SECONDS", "CloudflareAdapter"]

DEFAULT_VISIBILITY_SECONDS = 6.0
"""A pulled message's invisibility (renewed every third of it while its job runs): with
the lease, how soon a killed worker's jobs are delivered again."""
DEFAULT_LEASE_SECONDS = 5.0
"""The activation lease, shorter than the visibility, so it has expired (or nearly)
when a killed worker's message is pulled again."""

_WAIT_SECONDS = 20.0  # one long poll for a result; below the client's timeout
_MARK_DELAY = 0.05  # how long a follow-up mark waits for a call to ride along with


class CloudflareAdapter(PullingAdapter[InboxMessage]):
    """A flowcraft worker (and operator client) on Cloudflare, through the companion Worker.

    Args:
        runtime_options: the blueprints and node implementations this worker runs.
        settings: where the Worker is and its shared secret (a client is made, owned
            and closed by :meth:`aclose`), or ``client``: a shared :class:`WorkerClient`.
        queue_name: the inbox (logical queue) this worker consumes and sends to.
        namespace: keeps apps sharing one Worker apart (object names start with it).
        direct: send jobs straight into the inbox instead of through the Cloudflare Queue.
        delivery: ``"inbox"`` (default: the Worker's ``queue()`` moves messages into the
            inbox object, which Python pulls, renews and acks through the Worker) or
            ``"http-pull"`` (Python pulls the Cloudflare Queue itself with Cloudflare's
            HTTP pull consumer API; needs ``queues_api``; see
            :mod:`flowcraft_cloudflare.pull_consumer` for what it cannot do).
        queues_api: the account, queue id and API token for ``"http-pull"``.
        poll_seconds: how long one pull waits for a message (<= 25).
        max_value_bytes: the largest key + value a run object row takes (2 MB).
        event_bus: see ``BaseDistributedAdapter``.
        **options: ``concurrency``, ``visibility_seconds``, ``ack_batch_size``,
            ``ack_batch_window``, ``max_deliveries`` (``PullingAdapter``); ``retry_mode``,
            ``retry_delay_seconds``, ``key_prefix``, ``state_ttl_seconds``,
            ``lease_seconds``, ``reconcile_interval_seconds``... (``BaseDistributedAdapter``).
    """

    max_delay_seconds = float(MAX_DELAY_SECONDS)  # Cloudflare Queues' longest delay: 12 h

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        settings: WorkerSettings | None = None,
        client: WorkerClient | None = None,
        queue_name: str = "flowcraft-jobs",
        namespace: str = "flowcraft",
        direct: bool = False,
        delivery: Literal["inbox", "http-pull"] = "inbox",
        queues_api: QueuesApiSettings | None = None,
        poll_seconds: float = 2.0,
        max_value_bytes: int = MAX_VALUE_BYTES,
        event_bus: EventBus | None = None,
        **options: Any,
    ) -> None:
        if (settings is None) == (client is None):
            raise ValueError("pass settings= or client=, exactly one")
        if not 0 <= poll_seconds <= 25:
            raise ValueError("poll_seconds must be 0..25")
        if delivery not in ("inbox", "http-pull"):
            raise ValueError('delivery must be "inbox" or "http-pull"')
        if (delivery == "http-pull") != (queues_api is not None):
            raise ValueError('queues_api= goes with delivery="http-pull", and only with it')
        options.setdefault("visibility_seconds", DEFAULT_VISIBILITY_SECONDS)
        options.setdefault("lease_seconds", DEFAULT_LEASE_SECONDS)
        if options["visibility_seconds"] > 12 * 3600:
            raise ValueError("visibility_seconds must be at most 43200 (12 h)")
        self._owns_client = client is None
        if client is None:
            assert settings is not None
            client = WorkerClient(settings)
        self.client = client
        store = DurableObjectCoordinationStore(
            client, namespace=namespace, key_prefix=options.get("key_prefix", "flowcraft:")
        )
        options.setdefault("ack_batch_size", 100)
        options.setdefault("ack_batch_window", 0.01)
        super().__init__(
            runtime_options=runtime_options,
            coordination_store=store,
            event_bus=event_bus,
            **options,
        )
        self.namespace = namespace
        self.inbox = Inbox(client, queue_name, direct=direct)
        self.delivery = delivery
        self.pull_consumer = PullConsumer(queues_api) if queues_api is not None else None
        self.poll_seconds = poll_seconds
        self.max_value_bytes = max_value_bytes
        self.serializer = runtime_options.serializer or JsonSerializer()
        self._late: set[asyncio.Future[None]] = set()
        self._marks = PendingOps()
        self._marks_flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Future[None]] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(queue={self.inbox.name!r}, worker_id={self.worker_id!r})"

    # ------------------------------------------------------------ the seed's primitives

    def create_context(self, run_id: str) -> DurableObjectContext:
        return self.run_context(run_id)

    def run_context(self, run_id: str) -> DurableObjectContext:
        """The run's object as a context, for the adapter's own calls (``create_context``
        may be wrapped, e.g. by a test's meter)."""
        return DurableObjectContext(
            self.client,
            run_object(self.namespace, run_id),
            run_id,
            serializer=self.serializer,
            ttl_seconds=self.state_ttl_seconds,
            max_value_bytes=self.max_value_bytes,
            pending=self._marks,
            registry=registry_object(self.namespace),
        )

    async def mark_followed_up(self, run_id: str, node_id: str, generation: int) -> None:
        """Written behind: the mark rides along with the next call to the run's object
        (often the successor's admission), or goes within ``_MARK_DELAY`` in a call of
        its own. A lost mark only makes a duplicate redo an idempotent follow-up."""
        key = K.followed_up(self.key_prefix, run_id, node_id, generation)
        op = {"op": "setnx", "key": key, "value": "1", "ttl": self.dedupe_window_seconds}
        self._marks.add(run_object(self.namespace, run_id), {**op, "mark": True})
        if self._marks_flush is None:
            loop = asyncio.get_running_loop()
            self._marks_flush = loop.call_later(_MARK_DELAY, self._flush_marks_soon)

    def _flush_marks_soon(self) -> None:
        self._marks_flush = None
        flush = asyncio.ensure_future(self.flush_marks())
        self._flushing.add(flush)
        flush.add_done_callback(self._flushing.discard)

    async def flush_marks(self) -> None:
        """Send every waiting mark now (one call per object holding some)."""

        async def send(name: str, ops: list[dict[str, Any]]) -> None:
            try:
                await self.client.call("do", {"object": name, "ops": ops}, label="marks")
            except WorkerError as exc:
                self.logger.debug("%d follow-up marks lost: %r", len(ops), exc)

        taken = self._marks.take_all()
        await asyncio.gather(*(send(name, ops) for name, ops in taken.items()))

    async def _send(self, bodies: list[str], delay_seconds: float = 0) -> None:
        if self.pull_consumer is None:
            await self.inbox.send(bodies, delay_seconds=delay_seconds)
            return
        for body in bodies:
            self.inbox.check_size(body)
        await self.pull_consumer.send(bodies, delay_seconds=delay_seconds)

    async def enqueue_job(self, job: JobPayload) -> None:
        await self._send([job.encode().decode()])

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """One call for the whole batch (the Worker sends 100 messages a ``sendBatch``)."""
        await self._send([job.encode().decode() for job in jobs])

    async def enqueue_raw(self, body: bytes) -> None:
        """Put ``body`` on this adapter's queue unchecked (bytes that are not UTF-8 are
        sent as their UTF-8 reading with replacement characters: inbox bodies are text).
        :meth:`Inbox.send_raw` sends bytes with no envelope at all."""
        await self._send([body.decode("utf-8", "replace")])

    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Insert-if-absent in the run object: the first result published stays."""
        # Each context value is encoded on its own (its text inside the result's JSON):
        # a value may nest up to MAX_DEPTH, and the result must not add levels to it.
        context = {k: encode_value(k, v, self.serializer) for k, v in result.context.items()}
        stored = {"status": result.status, "errors": result.errors, "context": context}
        ctx = self.run_context(run_id)
        await ctx.batch([{"op": "result_put", "value": self.serializer.dumps(stored)}])

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        """The published result: one call to the run object."""
        (answer,) = await self.run_context(run_id).batch([{"op": "result_get"}])
        text = answer.get("value")
        if text is None:
            return None
        data = self.serializer.loads(text)
        context = {k: self.serializer.loads(v) for k, v in data["context"].items()}
        return FinalResult(run_id, data["status"], context, data.get("errors", []))

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        """A long poll on the run object, answered when the result is inserted there."""
        event = asyncio.Event()
        poll = asyncio.ensure_future(self._long_poll(run_id, event))
        try:
            yield ResultWatch(event)
        finally:
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)

    async def _long_poll(self, run_id: str, event: asyncio.Event) -> None:
        name = run_object(self.namespace, run_id)
        while True:
            try:
                answer = await self.client.call(
                    "wait", {"object": name, "timeout": _WAIT_SECONDS}, label="wait"
                )
            except WorkerError as exc:
                self.logger.debug("result long poll for %s failed: %s", run_id, exc)
                event.set()  # the waiter reads once, then polls with backoff
                await asyncio.sleep(1.0)
                continue
            if answer.get("value") is not None:
                event.set()
                return

    # ------------------------------------------------------------ the reconciler

    async def find_stalled_runs(self, older_than_seconds: float, limit: int) -> list[str]:
        """Running runs whose context has not been written for ``older_than_seconds``:
        one call to the namespace's registry object, which checks each candidate with
        its run object. A run returned is not returned again before another
        ``older_than_seconds`` without progress (so one stall is re-driven once per
        period); runs that ended or wait for a resume leave the index."""
        answer = await self.client.call(
            "registry",
            {
                "object": registry_object(self.namespace),
                "op": "stalled",
                "older_than": max(float(older_than_seconds), 0.0),
                "limit": max(int(limit), 1),
                "status_key": K.STATUS,
            },
        )
        return [str(run) for run in answer["runs"]][:limit]

    async def active_runs(self, limit: int = 100) -> list[str]:
        """The runs in the reconciler's index (running ones, oldest check first), read
        only (``flowcraft runs``). An entry whose removal was lost shows until the next
        ``find_stalled_runs`` that reaches it drops it."""
        answer = await self.client.call(
            "registry",
            {"object": registry_object(self.namespace), "op": "list", "limit": limit},
        )
        return [str(run) for run, _age in answer["runs"]]

    # ------------------------------------------------------------ the fast path

    async def admit(
        self, ctx: AsyncContext, payload: JobPayload, blueprint: WorkflowBlueprint, holder: str
    ) -> Admission:
        """The first reads, the second read and the lease as one call: one transaction
        in the run object, which holds the context and the lease alike."""
        analysis = self.runtime.analysis(blueprint)
        node_id = payload.node_id
        if node_id not in analysis.nodes or not isinstance(ctx, DurableObjectContext):
            # A wrapped context (a test's probe) sees the base's reads one by one.
            return await super().admit(ctx, payload, blueprint, holder)
        run = ctx
        op = {
            "op": "admit",
            "first": self.first_read_keys(node_id),
            "activation": list(K.activation_parts(node_id)),
            "waiting": K.waiting(node_id),
            "inputs": [
                self.likely_input_keys(analysis, node_id, 1),
                self.likely_input_keys(analysis, node_id, 2),
            ],
            "blueprint": [blueprint.id, blueprint.version],
            "final": sorted(FINAL_STATUSES),
            "lease": K.lease_stem(self.key_prefix, payload.run_id, node_id),
            "holder": holder,
            "ttl": self.lease_seconds,
        }
        (answer,) = await run.batch([op])
        state = run.decode_values({"values": answer["state"]})
        found = None if answer["found"] is None else run.decode_values({"values": answer["found"]})
        return Admission(state, found, answer["leased"])

    # ------------------------------------------------------------ the pull primitives

    async def receive(self, max_messages: int) -> Sequence[InboxMessage]:
        """Up to ``max_messages``, waiting at most ``poll_seconds`` when none is ready.

        A pull abandoned by ``stop()`` still runs in the inbox object (a dropped HTTP
        request does not cancel it there) and may take messages arriving meanwhile:
        it is left to finish, and what it took is released at once instead of staying
        hidden for a whole visibility timeout.

        With ``delivery="http-pull"``: one pull of the Cloudflare Queue, which answers at
        once; when it is empty, a wait of ``poll_seconds`` (cut short by ``stop()``)."""
        if self.pull_consumer is not None:
            found = await self.pull_consumer.pull(
                max_messages, visibility_seconds=self.visibility_seconds
            )
            if not found and not self.stopping:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._stopping.wait()
            return found
        pull = asyncio.ensure_future(
            self.inbox.pull(
                max_messages,
                visibility_seconds=self.visibility_seconds,
                wait_seconds=self.poll_seconds,
            )
        )
        try:
            return await asyncio.shield(pull)
        except asyncio.CancelledError:
            late = asyncio.ensure_future(self._release_late(pull))
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            raise

    async def _release_late(self, pull: asyncio.Future[list[InboxMessage]]) -> None:
        try:
            messages = await pull
            if messages:
                await self.inbox.release(messages, 0)
        except Exception as exc:
            self.logger.info("an abandoned pull's messages come back later: %r", exc)

    def message_body(self, message: InboxMessage) -> str:
        return message.body

    def delivery_count(self, message: InboxMessage) -> int | None:
        """Inbox: deliveries that were never settled, this one included (a release
        refunds). HTTP pull: Cloudflare's ``attempts`` (retries count there too)."""
        return message.attempts

    async def ack(self, messages: Sequence[InboxMessage]) -> None:
        """Inbox: one call, which also carries every follow-up mark waiting to be
        written (the Worker forwards them to their run objects): a job's mark is
        registered just before its ack, so it rides along instead of costing a call."""
        if self.pull_consumer is not None:
            await self.pull_consumer.settle(acks=messages)
            return
        riders = self._marks.take_all()
        try:
            await self.inbox.ack(messages, riders=riders)
        except WorkerError as exc:
            if riders:
                self.logger.debug("follow-up marks lost with an ack: %r", exc)
            raise

    async def renew(self, message: InboxMessage, seconds: float) -> None:
        """Inbox: hide the message ``seconds`` more. HTTP pull: nothing (Cloudflare's API
        cannot extend a lease; pull with a visibility above the longest node)."""
        if self.pull_consumer is None:
            await self.inbox.extend([message], seconds)

    async def release(self, message: InboxMessage, delay_seconds: float) -> None:
        """Deliverable again after ``delay_seconds`` (<= 12 h). Inbox: the delivery is
        refunded (the base counts failed attempts itself, so the inbox's count is left
        to crashes). HTTP pull: a retry, which Cloudflare counts as an attempt; near
        ``max_retries`` the base re-sends instead (:meth:`resend`)."""
        if self.pull_consumer is not None:
            await self.pull_consumer.settle(retries=[(message, delay_seconds)])
        else:
            await self.inbox.release([message], delay_seconds)

    async def redelivery_limit(self) -> int | None:
        """HTTP pull: the consumer's ``max_retries`` (Cloudflare drops or dead-letters
        a message there on its own). Inbox: ``max_deliveries`` (releases refund)."""
        if self.pull_consumer is not None:
            return self.pull_consumer.settings.max_retries
        return self.max_deliveries

    async def resend(self, message: InboxMessage, delay_seconds: float) -> bool:
        """HTTP pull: a fresh copy (its attempts start again), then the old one acked.
        The inbox refunds hand-backs and never needs it."""
        if self.pull_consumer is None:
            return False
        await self.pull_consumer.send([message.body], delay_seconds=delay_seconds)
        await self.pull_consumer.settle(acks=[message])
        return True

    async def dead_letter(self, message: InboxMessage, reason: str) -> None:
        """Inbox: parked in the inbox object with its reason. HTTP pull: parked there
        too (through the Worker), then acked on the Cloudflare Queue."""
        if self.pull_consumer is not None:
            await self.inbox.park(message, reason)
            await self.pull_consumer.settle(acks=[message])
        else:
            await self.inbox.dead_letter(message, reason)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return [
            DeadLetter(body=letter.body, reason=letter.error, id=letter.message_id)
            for letter in await self.inbox.dead_letters(limit)
        ]

    async def requeue_dead_letters(self, limit: int = 100) -> int:
        """Inbox: moved back among the inbox's messages in one atomic step. HTTP pull:
        each sent to the Cloudflare Queue, then removed (a crash in between duplicates
        a job, never loses one)."""
        if self.pull_consumer is None:
            return await self.inbox.requeue_dead(limit)
        letters = await self.inbox.dead_letters(limit)
        if letters:
            await self.pull_consumer.send([letter.body for letter in letters])
            await self.inbox.purge_dead(ids=[letter.message_id for letter in letters])
        return len(letters)

    async def purge_dead_letters(self, limit: int | None = None) -> int:
        return await self.inbox.purge_dead(limit)

    async def queue_depth(self) -> int | None:
        """Inbox: the messages ready to be pulled (delayed ones and those in hand are not
        told apart). HTTP pull: None (Cloudflare's API gives no backlog here)."""
        if self.pull_consumer is not None:
            return None
        return (await self.inbox.stats()).ready

    async def close(self) -> None:
        """Close the Worker client if this adapter made it (after abandoned pulls
        gave back what they took and waiting marks were sent)."""
        if self._late:
            await asyncio.gather(*self._late, return_exceptions=True)
        if self._marks_flush is not None:
            self._marks_flush.cancel()
            self._marks_flush = None
        await self.flush_marks()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._owns_client:
            await self.client.aclose()
        if self.pull_consumer is not None:
            await self.pull_consumer.aclose()
