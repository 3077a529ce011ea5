"""The state, the seed's contract and the hooks shared by every part of the base adapter."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from flowcraft._analysis import GraphAnalysis, analyse
from flowcraft.blueprint import NodeDefinition, WorkflowBlueprint
from flowcraft.context import AsyncContext
from flowcraft.distributed import keys as K
from flowcraft.distributed.coordination import CoordinationStore
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.redis import RedisCoordinationStore
from flowcraft.distributed.results import FinalResult, ResultStore, ResultWatch
from flowcraft.events import EventBus, FlowEvent, emit, wants
from flowcraft.runtime import FlowRuntime, RuntimeOptions

logger = logging.getLogger("flowcraft.distributed")


JobHandler = Callable[[JobPayload], Awaitable[None]]


RetryMode = Literal["in-process", "queue"]


FINAL_STATUSES = K.FINAL_STATUSES

_NO_SCOPE: AbstractAsyncContextManager[object] = contextlib.nullcontext()


class Instrumentation(Protocol):
    """What observes an adapter from outside it (``flowcraft.telemetry.Telemetry``):
    set as ``adapter.instrumentation``, it is asked for each job's scope and for the
    origin ``start_run`` keeps in a run's state."""

    def job_scope(self, job: JobPayload) -> AbstractAsyncContextManager[object]: ...

    def run_origin(self) -> dict[str, str] | None: ...


class _AdapterCore(ABC):
    """What every part of the base adapter shares: its state, the seed's contract and
    the hooks an adapter overrides (``adapter.py`` assembles the parts)."""

    def __init__(
        self,
        *,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore | None = None,
        redis_url: str | None = None,
        redis_options: Mapping[str, Any] | None = None,
        event_bus: EventBus | None = None,
        key_prefix: str = "flowcraft:",
        state_ttl_seconds: float = 7 * 24 * 3600,
        lease_seconds: float = 15.0,
        dedupe_window_seconds: float = 300.0,
        worker_id: str | None = None,
        retry_delay_seconds: float = 1.0,
        reconcile_interval_seconds: float | None = None,
        stalled_after_seconds: float = 300.0,
        retry_mode: RetryMode = "in-process",
    ) -> None:
        if retry_mode not in ("in-process", "queue"):
            raise ValueError(f"retry_mode must be 'in-process' or 'queue', not {retry_mode!r}")
        self.retry_mode: RetryMode = retry_mode
        self.runtime = FlowRuntime(runtime_options)
        # A store given is the caller's; one made from ``redis_url`` is closed by aclose().
        self.coordination_store, self._owned_store = RedisCoordinationStore.owned_or_given(
            url=redis_url, given=coordination_store, options=redis_options
        )
        self.event_bus = event_bus if event_bus is not None else runtime_options.event_bus
        self.key_prefix = key_prefix
        self.state_ttl_seconds = state_ttl_seconds
        self.lease_seconds = lease_seconds
        self.dedupe_window_seconds = dedupe_window_seconds
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.logger = runtime_options.logger or logger
        self.retry_delay_seconds = retry_delay_seconds
        self.reconcile_interval_seconds = reconcile_interval_seconds
        self.stalled_after_seconds = stalled_after_seconds
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------ the seed's contract

    @abstractmethod
    def create_context(self, run_id: str) -> AsyncContext:
        """The run's state in the adapter's store (one row/item/hash per run)."""

    @abstractmethod
    async def process_jobs(self, handler: JobHandler) -> None:
        """Consume jobs until ``stop()``; ack after ``handler`` returns, else act on
        ``job_disposition(exc)``."""

    @abstractmethod
    async def enqueue_job(self, job: JobPayload) -> None:
        """Put a job on the queue (applying ``get_queue_retry_options`` if used)."""

    @abstractmethod
    async def publish_final_result(self, run_id: str, result: FinalResult) -> None:
        """Publish the final result, idempotently: keep the FIRST result published for a
        run. A finalizer redone after a crash, or racing a duplicate of its job, calls
        this again with the same status and errors, but its context may also hold the
        writes of nodes nobody waited for (branches an ``any`` join or a failure left
        running), so a repeat must not replace what was published."""

    results: ResultStore | None = None
    """Where this adapter keeps final results, if in a :class:`ResultStore` (such as
    ``RedisResults``): the base then reads and watches them there."""

    instrumentation: Instrumentation | None = None
    """Tracing or metrics around each job and each start (None: nothing, at no cost)."""

    def job_scope(self, job: JobPayload) -> AbstractAsyncContextManager[object]:
        """An async context manager entered around each job's handling, its events
        included (a span, a timer): it sees the job's exception, if any. The default
        is ``instrumentation``'s; override to add an adapter's own."""
        if self.instrumentation is None:
            return _NO_SCOPE
        return self.instrumentation.job_scope(job)

    def run_origin(self) -> dict[str, str] | None:
        """What ``start_run`` keeps under ``_flowcraft.origin`` in a new run's state
        (the caller's trace context, so every worker's spans join the caller's trace);
        None keeps nothing. The default is ``instrumentation``'s."""
        return None if self.instrumentation is None else self.instrumentation.run_origin()

    max_delay_seconds: float | None = None
    """The longest delay this adapter's queue can release a job for (SQS 900 s,
    Pub/Sub 600 s, Cloudflare 12 h, ...; None: no limit). A durable sleep or a wait's
    timeout is released for the time left, at most this long, and a wake-up before
    its due time sleeps again. 0: the queue cannot delay; a pending timer's job is
    then acked, and the reconciler (``reconcile_interval_seconds``) enqueues it again
    once it is due."""

    def clock(self) -> float:
        """Wall-clock time (epoch seconds) of the run's timers: due times are kept in
        the run's state and read by other workers, so never the event loop's clock."""
        return time.time()

    concurrent_enqueues: ClassVar[bool] = False
    """Set True when ``enqueue_job`` may run concurrently and its round trips then
    overlap (a pipelining client, a confirm channel): ``enqueue_jobs`` sends a batch's
    jobs all at once instead of one after another."""

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        """Enqueue several jobs (a fan-out's successors, a run's start nodes) through
        ``enqueue_job``: one after another, or all at once (``concurrent_enqueues``).
        Override for a batch send; all are attempted before an error is raised."""
        if not self.concurrent_enqueues:
            for job in jobs:
                await self.enqueue_job(job)
            return
        outcomes = await asyncio.gather(
            *(self.enqueue_job(job) for job in jobs), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    def should_retry_in_process(self, node_def: NodeDefinition) -> bool:
        """False: run one attempt per delivery and let the queue schedule retries
        (``retry_mode="queue"``; the base counts the attempts and waits the node's
        backoff between them, unless the queue numbers attempts itself)."""
        return self.retry_mode == "in-process"

    def get_queue_retry_options(self, node_def: NodeDefinition) -> dict[str, Any] | None:
        """Queue-specific retry options for a node's jobs (e.g. attempts and backoff)."""
        return None

    def blueprint_for(self, blueprint_id: str) -> WorkflowBlueprint:
        return self.runtime.blueprint(blueprint_id)

    def node_for(self, job: JobPayload) -> NodeDefinition | None:
        """The node a job names, if this worker knows its blueprint."""
        bp = self.runtime.blueprints.get(job.blueprint_id)
        if bp is None:
            return None
        return analyse(bp).nodes.get(job.node_id)

    async def read_final_result(self, run_id: str) -> FinalResult | None:
        """What ``publish_final_result`` stored for the run, if anything: from
        ``self.results`` when the adapter keeps a :class:`ResultStore` there; override
        otherwise (without either, the base reads the run's state instead)."""
        if self.results is None:
            return None
        return await self.results.read(run_id)

    @contextlib.asynccontextmanager
    async def watch_result(self, run_id: str) -> AsyncIterator[ResultWatch | None]:
        """Wake ``wait_for_result`` when ``run_id``'s result is published: the watch of
        ``self.results``, or override and yield a :class:`ResultWatch` whose event the
        adapter sets then (a shared LISTEN or SUBSCRIBE connection, say). None: waiters
        only poll."""
        if self.results is None:
            yield None
            return
        async with self.results.watch(run_id) as watch:
            yield watch

    async def _enqueue(self, run_id: str, blueprint: WorkflowBlueprint, *node_ids: str) -> None:
        jobs = [JobPayload(run_id=run_id, blueprint_id=blueprint.id, node_id=n) for n in node_ids]
        if len(jobs) == 1:
            await self.enqueue_job(jobs[0])
        else:
            await self.enqueue_jobs(jobs)
        if wants(self.event_bus, "job:enqueued"):
            for node_id in node_ids:
                await emit(self.event_bus, FlowEvent("job:enqueued", run_id, node_id))

    async def mark_followed_up(self, run_id: str, node_id: str, generation: int) -> None:
        """Note that activation ``generation``'s follow-up is complete, so a duplicate of
        its job acks at once (``done`` key, ``dedupe_window_seconds``). Losing the mark
        only makes a duplicate redo an idempotent follow-up: an adapter may write it
        behind, batched with its next request."""
        await self.coordination_store.set_if_not_exist(
            K.followed_up(self.key_prefix, run_id, node_id, generation),
            "1",
            self.dedupe_window_seconds,
        )

    # ------------------------------------------------------------ provided by the other parts

    async def handle_job(self, job: JobPayload) -> None:
        raise NotImplementedError

    async def reconcile(self, run_id: str) -> int:
        raise NotImplementedError


def _claimed_status(claim: str | None) -> str | None:
    """The status in a final-status claim (``status`` or ``status:owner``)."""
    return None if claim is None else claim.partition(":")[0]


def _user_view(state: Mapping[str, Any]) -> dict[str, Any]:
    """The run's context without the protocol's reserved keys."""
    return {k: v for k, v in state.items() if not K.is_reserved(k)}


@dataclass(slots=True)
class _Lease:
    """The activation's lease as this worker knows it: ``held_at`` is the event loop
    time at which it was last confirmed (a request sent then succeeded)."""

    key: str
    holder: str
    held_at: float
    lost: bool = False


def _now() -> float:
    """Monotonic time on the running loop's clock (a simulation's virtual clock)."""
    return asyncio.get_running_loop().time()


@dataclass(slots=True)
class _Job:
    run_id: str
    blueprint: WorkflowBlueprint
    analysis: GraphAnalysis
    node_id: str
    ctx: AsyncContext
    lease: _Lease | None = None
    task: asyncio.Task[Any] | None = None
    """The task handling the job (cancelled at its next await if the run ends)."""
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    """The node's ``NodeContext.cancelled``: set when the run ended under it."""
    executing: bool = False
    stopped: bool = False
