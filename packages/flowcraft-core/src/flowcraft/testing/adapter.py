"""Conformance tests every distributed adapter must pass (PRODUCT.md guarantees 1-8).

Subclass :class:`AdapterConformanceTests` in a ``Test*`` class and give it an
``adapter_factory`` fixture: a callable ``(runtime_options, **options) -> adapter``
(or an awaitable of one) that builds a new worker on the same FRESH, empty,
namespaced backend each time it is called::

    class TestMyAdapter(AdapterConformanceTests):
        supports_dead_letter = True

        @pytest.fixture
        async def adapter_factory(self) -> AsyncIterator[AdapterFactory]:
            backend = await MyBackend.connect(namespace=uuid.uuid4().hex)

            def build(options: RuntimeOptions, **kw: Any) -> MyAdapter:
                return MyAdapter(runtime_options=options, backend=backend, **kw)

            yield build
            await backend.close()

        async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
            await adapter.queue.send(raw)

        async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
            return [m.error for m in await adapter.queue.dead_letters()]

Each test starts a :class:`Fleet` (a client adapter plus worker adapters running
``worker()``), runs flows through it and checks the results and what the workers
did. The fleet observes adapters only through the base class's contract (its four
primitives and the operator API), so the kit fits any backend.

Flags skip what a backend cannot do, with the reason: ``supports_dead_letter``,
``supports_queue_retry`` (``queue_retry_options`` are passed to the factory),
``supports_duplicate_injection`` (the kit enqueues every job twice; a queue that
deduplicates messages cannot be tested that way). A test that the backend cannot
pass may be overridden only if marked ``@pytest.mark.xfail(reason=...)``;
``test_no_overrides_DO_NOT_OVERRIDE`` fails otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import inspect
import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from flowcraft.context import AsyncContext, BaseAsyncContext, Guard, PatchOperation
from flowcraft.distributed.adapter import BaseDistributedAdapter, FinalResult
from flowcraft.distributed.payload import JobPayload
from flowcraft.events import CollectingEventBus, FlowEvent
from flowcraft.flow import Flow
from flowcraft.node import NodeContext, NodeResult, idempotency_key
from flowcraft.runtime import RuntimeOptions
from flowcraft.testing.fidelity import ValueFidelityTests
from flowcraft.testing.store import _GUARD, _KIT_MODULE_PREFIX, _override_problems

__all__ = [
    "AdapterConformanceTests",
    "AdapterFactory",
    "ContextMeter",
    "Fleet",
    "SideEffects",
    "meter_contexts",
]

AdapterFactory = Callable[..., BaseDistributedAdapter | Awaitable[BaseDistributedAdapter]]
"""``factory(runtime_options, **options)``: a new worker on the test's backend."""

_FINAL = frozenset({"completed", "failed", "cancelled"})
# Set while a Fleet's instrumented enqueue_jobs runs: the adapter's enqueue_jobs may
# call enqueue_job for each job, which must not be counted (or duplicated) twice.
_IN_BATCH: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "flowcraft_fleet_in_batch", default=False
)

# Context keys that break naive stores: quoting, templating, paths, escapes, size.
HOSTILE_KEYS = [
    "quotes ' \" `",
    "braces {a} {{b}} ${c} %(d)s",
    "dots.in.the.key",
    "back\\slash \\n \\\\",
    "unicode é 中文 🚀 \u200b",
    "$dollar $1 $$",
    "colon:and;semi",
    "brackets [0] ['x']",
    'json {"k": [1, 2]}',
    "sql '); DROP TABLE runs; --",
    "new\nline\ttab",
    "k" * 1024,
]


def _size(value: Any) -> int:
    # Measuring must never fail the operation it measures (the store refuses the value).
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):
        return 0
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass
class ContextMeter:
    """What the workers' run contexts were asked to do: operations and bytes moved."""

    ops: Counter[str] = field(default_factory=Counter)
    patch_bytes: list[int] = field(default_factory=list)
    read_bytes: list[int] = field(default_factory=list)

    def reset(self) -> None:
        self.ops.clear()
        self.patch_bytes.clear()
        self.read_bytes.clear()


class _MeteredContext(BaseAsyncContext):
    """Delegates to the adapter's context, counting each call and its bytes."""

    def __init__(self, inner: AsyncContext, meter: ContextMeter) -> None:
        self._inner = inner
        self._meter = meter

    async def get(self, key: str) -> Any:
        self._meter.ops["get"] += 1
        value = await self._inner.get(key)
        self._meter.read_bytes.append(_size(value))
        return value

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        self._meter.ops["get_many"] += 1
        found = await self._inner.get_many(keys)
        self._meter.read_bytes.append(_size(found))
        return found

    async def has(self, key: str) -> bool:
        self._meter.ops["has"] += 1
        return await self._inner.has(key)

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        self._meter.ops["patch"] += 1
        self._meter.patch_bytes.append(_size([o.to_json_dict() for o in ops]))
        return await self._inner.patch(ops, guard=guard)

    async def to_dict(self) -> dict[str, Any]:
        self._meter.ops["to_dict"] += 1
        return await self._inner.to_dict()


class SideEffects:
    """Side effects outside the workflow, keyed by each activation's idempotency key.

    ``step(fn)`` wraps a node so every execution that returns is recorded (with
    its attempt and input) before the result goes back to the adapter.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.inputs: dict[str, list[Any]] = {}
        self.attempts: dict[str, list[int]] = {}

    def step(self, fn: Callable[[NodeContext], Any] | None = None) -> Callable[..., Any]:
        async def node(ctx: NodeContext) -> Any:
            self.attempts.setdefault(ctx.idempotency_key, []).append(ctx.attempt)
            out = fn(ctx) if fn is not None else ctx.input
            if inspect.isawaitable(out):
                out = await out
            self.calls[ctx.idempotency_key] += 1
            self.inputs.setdefault(ctx.idempotency_key, []).append(ctx.input)
            return out

        return node

    def keys(self, run_id: str, node_id: str) -> list[str]:
        """The activations of a node that ran, in order (their idempotency keys)."""
        prefix = idempotency_key(run_id, node_id, 0)[:-1]
        found = [k for k in self.calls if k.startswith(prefix) and k[len(prefix) :].isdigit()]
        return sorted(found, key=lambda k: int(k[len(prefix) :]))

    def ran(self, run_id: str, node_id: str) -> int:
        return len(self.keys(run_id, node_id))

    def input_of(self, run_id: str, node_id: str, activation: int = 1) -> Any:
        return self.inputs[idempotency_key(run_id, node_id, activation)][-1]


class Fleet:
    """A client adapter and worker adapters on one backend, for one test.

    Every adapter the fleet builds is observed through its primitives:
    ``publications`` (each ``publish_final_result`` call), ``meter`` (the workers'
    context operations), ``events``; ``duplicate_enqueues`` enqueues each job
    twice and ``drop_next_enqueue`` loses one, as a faulty queue would.
    """

    def __init__(
        self, factory: AdapterFactory, runtime_options: RuntimeOptions, *, timeout: float
    ) -> None:
        self.events = CollectingEventBus()
        self.options = dataclasses.replace(runtime_options, event_bus=self.events)
        self.timeout = timeout
        self.publications: list[FinalResult] = []
        self.meter = ContextMeter()
        self.duplicate_enqueues = False
        self.enqueued: list[JobPayload] = []
        self.dropped: list[JobPayload] = []
        self._factory = factory
        self._drop: Callable[[JobPayload], bool] | None = None
        self._client: BaseDistributedAdapter | None = None
        self._workers: list[tuple[BaseDistributedAdapter, asyncio.Future[None]]] = []

    async def adapter(
        self, runtime_options: RuntimeOptions | None = None, **options: Any
    ) -> BaseDistributedAdapter:
        """A new adapter from the factory, instrumented (not processing jobs)."""
        if runtime_options is not None:
            runtime_options = dataclasses.replace(runtime_options, event_bus=self.events)
        made = self._factory(runtime_options or self.options, **options)
        adapter = await made if inspect.isawaitable(made) else made
        self._instrument(adapter)
        return adapter

    @property
    def client(self) -> BaseDistributedAdapter:
        """The adapter the test uses as an operator (start, status, wait, resume)."""
        if self._client is None:
            raise RuntimeError("call Fleet.start() first")
        return self._client

    async def start(
        self,
        workers: int,
        runtime_options: RuntimeOptions | None = None,
        **options: Any,
    ) -> list[BaseDistributedAdapter]:
        """Build the client (once) and start ``workers`` more workers."""
        if self._client is None:
            self._client = await self.adapter(**options)
        started = []
        for _ in range(workers):
            adapter = await self.adapter(runtime_options, **options)
            self._meter_contexts(adapter)
            task = asyncio.ensure_future(adapter.worker())
            self._workers.append((adapter, task))
            started.append(adapter)
        await asyncio.sleep(0)
        return started

    async def stop(self, workers: Iterable[BaseDistributedAdapter] | None = None) -> None:
        """Stop workers (all by default) and wait for them; a worker that died raises."""
        chosen = list(workers) if workers is not None else [a for a, _ in self._workers]
        for adapter in chosen:
            await adapter.stop()
        tasks = [t for a, t in self._workers if a in chosen]
        self._workers = [(a, t) for a, t in self._workers if a not in chosen]
        if tasks:
            async with asyncio.timeout(self.timeout):
                await asyncio.gather(*tasks)

    def dead_workers(self) -> list[BaseException | None]:
        """Workers whose ``worker()`` ended before ``stop()`` (with their error)."""
        return [t.exception() for _, t in self._workers if t.done()]

    async def run(
        self, blueprint_id: str, initial: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> FinalResult:
        """Start a run and wait for its final result."""
        run_id = await self.client.start_run(blueprint_id, initial, **kwargs)
        return await self.client.wait_for_result(run_id, self.timeout)

    async def until(self, check: Callable[[], Any], what: str) -> None:
        """Poll ``check`` (sync or async) until it is truthy; fail after the timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    found = check()
                    if inspect.isawaitable(found):
                        found = await found
                    if found:
                        return
                    await asyncio.sleep(0.01)
        except TimeoutError:
            pytest.fail(f"timed out after {self.timeout} s waiting for {what}")

    async def status(self, run_id: str) -> str:
        return (await self.client.get_status(run_id)).status

    def drop_next_enqueue(self, check: Callable[[JobPayload], bool]) -> None:
        """Lose the next enqueued job that ``check`` accepts (once)."""
        self._drop = check

    def published(self, run_id: str) -> list[FinalResult]:
        return [p for p in self.publications if p.run_id == run_id]

    def events_of(self, kind: str, run_id: str | None = None) -> list[FlowEvent]:
        return [
            e
            for e in self.events.events
            if e.type == kind and (run_id is None or e.run_id == run_id)
        ]

    # ---------------------------------------------------------------- instrumentation

    def _instrument(self, adapter: BaseDistributedAdapter) -> None:
        enqueue = adapter.enqueue_job
        enqueue_many = adapter.enqueue_jobs
        publish = adapter.publish_final_result

        def kept(job: JobPayload) -> bool:
            if self._drop is not None and self._drop(job):
                self._drop = None
                self.dropped.append(job)
                return False
            self.enqueued.append(job)
            return True

        async def enqueue_job(job: JobPayload) -> None:
            if _IN_BATCH.get():  # a job of a batch enqueue_jobs below already counted
                await enqueue(job)
                return
            if kept(job):
                await enqueue(job)
                if self.duplicate_enqueues:
                    await enqueue(job)

        async def enqueue_jobs(jobs: Sequence[JobPayload]) -> None:
            sent = [job for job in jobs if kept(job)]
            if self.duplicate_enqueues:
                sent += sent
            token = _IN_BATCH.set(True)
            try:
                await enqueue_many(sent)
            finally:
                _IN_BATCH.reset(token)

        async def publish_final_result(run_id: str, result: FinalResult) -> None:
            self.publications.append(result)
            await publish(run_id, result)

        adapter.enqueue_job = enqueue_job  # type: ignore[method-assign]
        adapter.enqueue_jobs = enqueue_jobs  # type: ignore[method-assign]
        adapter.publish_final_result = publish_final_result  # type: ignore[method-assign]

    def _meter_contexts(self, adapter: BaseDistributedAdapter) -> None:
        meter_contexts(adapter, self.meter)


def meter_contexts(adapter: BaseDistributedAdapter, meter: ContextMeter) -> None:
    """Count every operation (and its bytes) on the run contexts ``adapter`` creates."""
    create = adapter.create_context

    def create_context(run_id: str) -> AsyncContext:
        return _MeteredContext(create(run_id), meter)

    adapter.create_context = create_context  # type: ignore[method-assign]


def _outputs(result: FinalResult) -> dict[str, Any]:
    prefix = "_outputs."
    return {k[len(prefix) :]: v for k, v in result.context.items() if k.startswith(prefix)}


def _assert_one_final_result(fleet: Fleet, result: FinalResult) -> None:
    published = fleet.published(result.run_id)
    assert published, "the final result was never published"
    first = published[0].to_json_dict()
    assert all(p.to_json_dict() == first for p in published), (
        f"run {result.run_id} published {len(published)} different final results: "
        f"{[p.to_json_dict() for p in published]}"
    )
    assert first["status"] == result.status


def _add(n: int) -> Callable[[NodeContext], Any]:
    return lambda ctx: ctx.input + n


def _const(value: Any) -> Callable[[NodeContext], Any]:
    return lambda ctx: value


class _Boom(RuntimeError):
    pass


def _boom(ctx: NodeContext) -> Any:
    raise _Boom(f"{ctx.node_id} exploded on attempt {ctx.attempt}")


@pytest.mark.asyncio
class AdapterConformanceTests(ValueFidelityTests):
    """The distributed adapter contract, as tests (see the module docstring)."""

    supports_dead_letter: ClassVar[bool] = True
    """The queue moves jobs it cannot process aside; override ``dead_letters``."""

    supports_queue_retry: ClassVar[bool] = True
    """The queue can schedule a node's retries (``queue_retry_options``)."""

    supports_duplicate_injection: ClassVar[bool] = True
    """The queue delivers a message enqueued twice twice (no deduplication)."""

    queue_retry_options: ClassVar[Mapping[str, Any]] = {"retry_mode": "queue"}
    """Factory options that switch a worker to queue-native retries."""

    worker_count: ClassVar[int] = 2
    """Workers each test starts (on the same backend)."""

    timeout_seconds: ClassVar[float] = 30.0
    """How long a run (or anything the kit waits for) may take before the test fails."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _GUARD in vars(cls) and not cls.__module__.startswith(_KIT_MODULE_PREFIX):
            raise TypeError(f"{cls.__qualname__} must not override {_GUARD}")

    @pytest.fixture
    def adapter_factory(self) -> AdapterFactory:
        """Override: ``(runtime_options, **options) -> adapter`` on a FRESH, EMPTY backend."""
        raise NotImplementedError(f"{type(self).__name__} must define an `adapter_factory` fixture")

    async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
        """Put ``raw`` on the adapter's queue as a message body, unchecked: the adapter's
        own ``enqueue_raw`` hook (override only if the test must do it otherwise)."""
        await adapter.enqueue_raw(raw)

    async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
        """The reasons of the dead-lettered jobs: the adapter's ``dead_letters`` hook."""
        return [letter.reason for letter in await adapter.dead_letters()]

    @contextlib.asynccontextmanager
    async def fleet(
        self, factory: AdapterFactory, *flows: Flow, workers: int | None = None, **options: Any
    ) -> AsyncIterator[Fleet]:
        """A started fleet running ``flows``; stopped (and checked alive) on exit."""
        fleet = Fleet(factory, RuntimeOptions.from_flows(*flows), timeout=self.timeout_seconds)
        await fleet.start(self.worker_count if workers is None else workers, **options)
        try:
            yield fleet
            assert fleet.dead_workers() == [], "a worker died"
        finally:
            await fleet.stop()

    # ---------------------------------------------------------------- the guard

    async def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:
        """Kit tests may only be overridden to mark them xfail with a reason."""
        problems = _override_problems(type(self))
        if problems:
            pytest.fail(f"{type(self).__name__} weakens the kit: " + "; ".join(problems))

    # ---------------------------------------------------------------- traversal

    async def test_linear_chain(self, adapter_factory: AdapterFactory) -> None:
        """A chain runs each node once, in order, passing outputs along."""
        fx = SideEffects()
        flow = (
            Flow("linear")
            .node("a", fx.step(lambda c: c.input or 1))
            .node("b", fx.step(lambda c: c.input + 1))
            .node("c", fx.step(lambda c: c.input * 10))
            .chain("a", "b", "c")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("linear", {"user": "ann"})
            assert result.status == "completed", result.errors
            assert result.errors == []
            assert _outputs(result) == {"a": 1, "b": 2, "c": 20}
            assert result.context["user"] == "ann"
            assert all(fx.ran(result.run_id, n) == 1 for n in "abc")
            assert set(fx.calls.values()) == {1}
            _assert_one_final_result(fleet, result)

    async def test_condition_branch_not_taken(self, adapter_factory: AdapterFactory) -> None:
        """A false condition skips its branch, which never runs nor blocks the join."""
        fx = SideEffects()
        flow = (
            Flow("cond")
            .node("a", fx.step(lambda c: 1))
            .node("x", fx.step())
            .node("x2", fx.step())
            .node("y", fx.step(lambda c: c.input + 1))
            .node("j", fx.step())
            .edge("a", "x", condition="result.output > 5")
            .edge("a", "y", condition="result.output <= 5")
            .chain("x", "x2", "j")
            .edge("y", "j")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("cond")
            assert result.status == "completed", result.errors
            assert fx.ran(result.run_id, "x") == fx.ran(result.run_id, "x2") == 0
            assert fx.input_of(result.run_id, "j") == {"y": 2}
            assert "_outputs.x" not in result.context
            assert "_outputs.x2" not in result.context
            assert _outputs(result)["j"] == {"y": 2}

    async def test_action_branch_not_taken(self, adapter_factory: AdapterFactory) -> None:
        """The result's action picks its edge; the other action's branch never runs."""
        fx = SideEffects()
        flow = (
            Flow("act")
            .node("d", fx.step(lambda c: NodeResult(output="ok", action="approve")))
            .node("yes", fx.step(lambda c: f"approved {c.input}"))
            .node("no", fx.step(lambda c: "rejected"))
            .node("end", fx.step())
            .edge("d", "yes", action="approve")
            .edge("d", "no", action="reject")
            .edge("yes", "end")
            .edge("no", "end")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("act")
            assert result.status == "completed", result.errors
            assert fx.ran(result.run_id, "no") == 0
            assert _outputs(result)["end"] == {"yes": "approved ok"}

    async def test_fan_out_into_all_join(self, adapter_factory: AdapterFactory) -> None:
        """An ``all`` join runs once, with a dict of every branch's output."""
        fx = SideEffects()
        flow = Flow("fan").node("s", fx.step(lambda c: 10)).node("j", fx.step())
        for i in range(5):
            flow.node(f"b{i}", fx.step(_add(i)))
            flow.edge("s", f"b{i}").edge(f"b{i}", "j")
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("fan")
            assert result.status == "completed", result.errors
            expected = {f"b{i}": 10 + i for i in range(5)}
            assert fx.calls[f"{result.run_id}:j:1"] == 1
            assert fx.input_of(result.run_id, "j") == expected
            assert _outputs(result)["j"] == expected

    async def test_fan_out_into_any_join(self, adapter_factory: AdapterFactory) -> None:
        """An ``any`` join runs once, on one branch."""
        fx = SideEffects()
        flow = (
            Flow("anyjoin")
            .node("s", fx.step(lambda c: 0))
            .node("j", fx.step(), join_strategy="any")
            .node("after", fx.step())
            .edge("j", "after")
        )
        for i in range(4):
            flow.node(f"b{i}", fx.step(_const(f"branch {i}")))
            flow.edge("s", f"b{i}").edge(f"b{i}", "j")
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("anyjoin")
            assert result.status == "completed", result.errors
            assert fx.keys(result.run_id, "j") == [f"{result.run_id}:j:1"]
            assert fx.calls[f"{result.run_id}:j:1"] == 1
            assert fx.input_of(result.run_id, "j") in {f"branch {i}" for i in range(4)}
            assert fx.ran(result.run_id, "after") == 1
            # the run ends when its sinks resolve: branches the join did not wait for
            # may be dropped, but none runs twice
            assert all(fx.ran(result.run_id, f"b{i}") <= 1 for i in range(4))
            assert set(fx.calls.values()) == {1}

    async def test_loop_runs_once_per_iteration(self, adapter_factory: AdapterFactory) -> None:
        """A node on a cycle runs once per iteration, then the exit edge is followed."""
        fx = SideEffects()

        async def body(ctx: NodeContext) -> int:
            n = (await ctx.get("n") or 0) + 1
            await ctx.set("n", n)
            return int(n)

        flow = (
            Flow("loop")
            .node("init", fx.step(lambda c: 0))
            .node("body", fx.step(body))
            .node("check", fx.step())
            .node("after", fx.step(lambda c: f"done after {c.input}"))
            .chain("init", "body", "check")
            .loop("body", "check", while_="n < 4")
            .edge("check", "after")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("loop")
            run = result.run_id
            assert result.status == "completed", result.errors
            assert result.context["n"] == 4
            assert fx.keys(run, "body") == [f"{run}:body:{i}" for i in range(1, 5)]
            assert fx.keys(run, "check") == [f"{run}:check:{i}" for i in range(1, 5)]
            assert set(fx.calls.values()) == {1}, "an iteration ran twice"
            assert _outputs(result)["after"] == "done after 4"

    # ---------------------------------------------------------------- failures

    async def test_failure_fails_run_once(self, adapter_factory: AdapterFactory) -> None:
        """After its last attempt a failing node fails the run once; successors never run."""
        fx = SideEffects()
        flow = (
            Flow("fails")
            .node("s", fx.step(lambda c: 1))
            .node("bad", fx.step(_boom), max_retries=2)
            .node("after", fx.step())
            .node("ok", fx.step())
            .chain("s", "bad", "after")
            .edge("s", "ok")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("fails")
            assert result.status == "failed"
            assert len(result.errors) == 1, result.errors
            assert result.errors[0]["nodeId"] == "bad"
            assert "bad exploded" in result.errors[0]["message"]
            assert fx.ran(result.run_id, "after") == 0
            assert "_outputs.after" not in result.context
            assert await fleet.status(result.run_id) == "failed"
            _assert_one_final_result(fleet, result)

    async def test_concurrent_failures_publish_one_result(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Two branches failing at once still give one final result with one error."""
        fx = SideEffects()
        flow = Flow("twofail").node("s", fx.step(lambda c: 1)).node("j", fx.step())
        for name in ("bad1", "bad2", "bad3"):
            flow.node(name, fx.step(_boom)).edge("s", name).edge(name, "j")
        async with self.fleet(adapter_factory, flow, workers=max(self.worker_count, 3)) as fleet:
            result = await fleet.run("twofail")
            assert result.status == "failed"
            assert len(result.errors) == 1, result.errors
            assert result.errors[0]["nodeId"] in {"bad1", "bad2", "bad3"}
            assert fx.ran(result.run_id, "j") == 0
            await fleet.until(
                lambda: (
                    len(fleet.events_of("job:failed", result.run_id))
                    + len(fleet.events_of("job:processed", result.run_id))
                    >= 4
                ),
                "every job of the run to be handled",
            )
            _assert_one_final_result(fleet, result)
            status = await fleet.client.get_status(result.run_id)
            assert status.status == "failed"
            assert status.errors == result.errors

    async def test_in_process_retries(self, adapter_factory: AdapterFactory) -> None:
        """A node that fails twice succeeds on its third attempt, retried by the worker."""
        fx = SideEffects()

        async def flaky(ctx: NodeContext) -> str:
            await ctx.set(f"attempt{ctx.attempt}", True)
            if ctx.attempt < 3:
                raise _Boom("transient")
            return f"ok on {ctx.attempt}"

        attempts: list[int] = []

        async def counted(ctx: NodeContext) -> str:
            attempts.append(ctx.attempt)
            return await flaky(ctx)

        flow = (
            Flow("retry")
            .node("f", fx.step(counted), max_retries=3, retry_delay=1)
            .node("g", fx.step())
            .chain("f", "g")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("retry")
            assert result.status == "completed", result.errors
            assert attempts == [1, 2, 3]
            assert _outputs(result)["g"] == "ok on 3"
            assert "attempt1" not in result.context, "a failed attempt's writes leaked"
            assert result.context["attempt3"] is True

    async def test_queue_retries(self, adapter_factory: AdapterFactory) -> None:
        """In queue retry mode each attempt is a delivery; the third succeeds."""
        if not self.supports_queue_retry:
            pytest.skip(f"{type(self).__name__}: the queue has no native retries")
        attempts: list[int] = []

        async def flaky(ctx: NodeContext) -> str:
            attempts.append(ctx.attempt)
            await ctx.set(f"attempt{ctx.attempt}", True)
            if ctx.attempt < 3:
                raise _Boom("transient")
            return f"ok on {ctx.attempt}"

        flow = Flow("qretry").node("f", flaky, max_retries=3).node("g", lambda c: c.input)
        flow.chain("f", "g")
        async with self.fleet(adapter_factory, flow, **self.queue_retry_options) as fleet:
            result = await fleet.run("qretry")
            assert result.status == "completed", result.errors
            assert attempts == [1, 2, 3]
            assert _outputs(result)["g"] == "ok on 3"
            assert "attempt1" not in result.context
            assert len(fleet.events_of("job:requeued", result.run_id)) >= 2

    async def test_queue_retries_exhausted_fail_once(self, adapter_factory: AdapterFactory) -> None:
        """In queue retry mode the last failed attempt fails the run, once."""
        if not self.supports_queue_retry:
            pytest.skip(f"{type(self).__name__}: the queue has no native retries")
        attempts: list[int] = []

        def always(ctx: NodeContext) -> None:
            attempts.append(ctx.attempt)
            raise _Boom(f"attempt {ctx.attempt}")

        flow = Flow("qfail").node("f", always, max_retries=2).node("g", lambda c: c.input)
        flow.chain("f", "g")
        async with self.fleet(adapter_factory, flow, **self.queue_retry_options) as fleet:
            result = await fleet.run("qfail")
            assert result.status == "failed"
            assert attempts == [1, 2]
            assert [e["nodeId"] for e in result.errors] == ["f"]
            _assert_one_final_result(fleet, result)

    async def test_fallback(self, adapter_factory: AdapterFactory) -> None:
        """A node that fails every attempt is replaced by its fallback's output."""
        fx = SideEffects()
        flow = (
            Flow("fb")
            .node("fetch", fx.step(_boom), max_retries=2, fallback="cached")
            .node("cached", fx.step(lambda c: "from cache"))
            .node("use", fx.step())
            .chain("fetch", "use")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("fb")
            assert result.status == "completed", result.errors
            assert _outputs(result)["use"] == "from cache"
            assert "_outputs.cached" not in result.context

    # ---------------------------------------------------------------- waits and versions

    async def test_wait_then_resume_with_action(self, adapter_factory: AdapterFactory) -> None:
        """A wait pauses the run; ``resume_with_action`` supplies the output and the edge."""
        fx = SideEffects()
        flow = (
            Flow("approval")
            .node("draft", fx.step(lambda c: "draft text"))
            .wait("review")
            .node("publish", fx.step(lambda c: f"published: {c.input}"))
            .node("discard", fx.step(lambda c: "discarded"))
            .chain("draft", "review")
            .edge("review", "publish", action="approve")
            .edge("review", "discard", action="reject")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("approval")
            await fleet.until(lambda: _is(fleet.status(run), "awaiting"), "the run to pause")
            status = await fleet.client.get_status(run)
            assert status.waiting == ["review"]
            assert fx.ran(run, "publish") == 0
            await fleet.client.resume_with_action(run, "approve", output="final text")
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result)["publish"] == "published: final text"
            assert fx.ran(run, "discard") == 0
            assert "_outputs.discard" not in result.context
            _assert_one_final_result(fleet, result)

    async def test_version_mismatch_hands_job_back(self, adapter_factory: AdapterFactory) -> None:
        """A worker lacking the run's blueprint version hands the job back, never acks it."""
        fx = SideEffects()

        def versioned(version: str) -> Flow:
            return (
                Flow("versioned", version=version)
                .node("a", fx.step(lambda c: f"v{version}"))
                .node("b", fx.step())
                .chain("a", "b")
            )

        fleet = Fleet(
            adapter_factory, RuntimeOptions.from_flows(versioned("1")), timeout=self.timeout_seconds
        )
        try:
            await fleet.start(1, RuntimeOptions.from_flows(versioned("2")))
            run = await fleet.client.start_run("versioned")
            await fleet.until(
                lambda: any(
                    "version" in e.data.get("reason", "")
                    for e in fleet.events_of("job:requeued", run)
                ),
                "the v2 worker to hand the job back",
            )
            assert await fleet.status(run) == "running"
            assert fleet.published(run) == []
            assert fx.ran(run, "a") == 0
            await fleet.start(1)  # the v2 worker keeps running: it must not steal the job
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result) == {"a": "v1", "b": "v1"}
            assert fx.calls[f"{run}:a:1"] == 1
            assert fleet.dead_workers() == []
        finally:
            await fleet.stop()

    # ---------------------------------------------------------------- bad input

    async def test_unknown_blueprint_is_dead_lettered(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A job for a blueprint no worker knows is reported (and dead-lettered); other
        runs are unaffected."""
        flow = Flow("fine").node("a", lambda c: 1).node("b", lambda c: c.input + 1)
        flow.chain("a", "b")
        async with self.fleet(adapter_factory, flow) as fleet:
            bad = JobPayload(run_id="ghost-run", blueprint_id="no-such-blueprint", node_id="a")
            await fleet.client.enqueue_job(bad)
            result = await fleet.run("fine")
            assert result.status == "completed", result.errors
            assert _outputs(result) == {"a": 1, "b": 2}
            await fleet.until(
                lambda: fleet.events_of("job:failed", "ghost-run"), "the bad job to be reported"
            )
            (report,) = fleet.events_of("job:failed", "ghost-run")
            assert "no-such-blueprint" in report.data["error"]
            if self.supports_dead_letter:
                await fleet.until(
                    lambda: _has(self.dead_letters(fleet.client), "no-such-blueprint"),
                    "the job to be dead-lettered",
                )
            assert await fleet.status("ghost-run") == "unknown"

    async def test_undecodable_payload_is_dead_lettered(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Bytes that are not a job are dead-lettered; the worker survives and goes on."""
        flow = Flow("after-garbage").node("a", lambda c: "still working")
        async with self.fleet(adapter_factory, flow) as fleet:
            for raw in (b"\xff\xfe not utf-8", b"{not json", b'{"runId": 1}', b"[]"):
                await self.enqueue_raw(fleet.client, raw)
            result = await fleet.run("after-garbage")
            assert result.status == "completed", result.errors
            assert _outputs(result) == {"a": "still working"}
            if self.supports_dead_letter:
                await fleet.until(
                    lambda: _count(self.dead_letters(fleet.client), 4),
                    "four dead-lettered payloads",
                )
                errors = await self.dead_letters(fleet.client)
                assert all("payload" in e for e in errors), errors
            assert fleet.dead_workers() == []

    async def test_hostile_context_keys_round_trip(self, adapter_factory: AdapterFactory) -> None:
        """Keys with quotes, braces, dots, escapes, unicode, ``$`` and 1 KB survive exactly."""
        values = {key: {"value": f"for {key}", "n": i} for i, key in enumerate(HOSTILE_KEYS)}

        async def write(ctx: NodeContext) -> int:
            for key, value in values.items():
                await ctx.set(key, value)
            return len(values)

        async def read(ctx: NodeContext) -> dict[str, Any]:
            return {key: await ctx.get(key) for key in values}

        flow = Flow("hostile").node("w", write).node("r", read).chain("w", "r")
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("hostile", {HOSTILE_KEYS[0] + " initial": "seed"})
            assert result.status == "completed", result.errors
            assert _outputs(result)["r"] == values
            for key, value in values.items():
                assert result.context[key] == value, key
            assert result.context[HOSTILE_KEYS[0] + " initial"] == "seed"

    async def test_start_run_rejects_reserved_keys(self, adapter_factory: AdapterFactory) -> None:
        """``start_run`` refuses initial context keys in the protocol's reserved space."""
        flow = Flow("reserved").node("a", lambda c: 1)
        async with self.fleet(adapter_factory, flow) as fleet:
            with pytest.raises(ValueError, match="reserved"):
                await fleet.client.start_run("reserved", {"_flowcraft.status": "completed"})
            with pytest.raises(ValueError, match="reserved"):
                await fleet.client.start_run("reserved", {"_flowcraft.meta": {}}, run_id="r")
            assert await fleet.status("r") == "unknown"

    # ---------------------------------------------------------------- duplicates and cost

    async def test_duplicate_delivery_is_idempotent(self, adapter_factory: AdapterFactory) -> None:
        """Every job delivered twice: same results, each activation's side effect once,
        each join once."""
        if not self.supports_duplicate_injection:
            pytest.skip(f"{type(self).__name__}: the queue deduplicates messages")
        fx = SideEffects()

        async def body(ctx: NodeContext) -> int:
            n = (await ctx.get("n") or 0) + 1
            await ctx.set("n", n)
            await ctx.set(f"iteration {n}", ctx.idempotency_key)
            return int(n)

        flow = (
            Flow("dups")
            .node("s", fx.step(lambda c: 1))
            .node("all", fx.step())
            .node("any", fx.step(), join_strategy="any")
            .node("body", fx.step(body))
            .node("check", fx.step())
            .node("end", fx.step())
        )
        for i in range(3):
            flow.node(f"b{i}", fx.step(_add(i)))
            flow.edge("s", f"b{i}").edge(f"b{i}", "all").edge(f"b{i}", "any")
        flow.chain("all", "body", "check").loop("body", "check", while_="n < 3")
        flow.edge("check", "end").edge("any", "end")
        async with self.fleet(adapter_factory, flow) as fleet:
            fleet.duplicate_enqueues = True
            result = await fleet.run("dups")
            run = result.run_id
            assert result.status == "completed", result.errors
            assert result.context["n"] == 3
            assert result.context["iteration 2"] == f"{run}:body:2"
            assert _outputs(result)["all"] == {"b0": 1, "b1": 2, "b2": 3}
            assert fx.keys(run, "body") == [f"{run}:body:{i}" for i in (1, 2, 3)]
            assert fx.ran(run, "all") == fx.ran(run, "any") == fx.ran(run, "end") == 1
            assert {k: c for k, c in fx.calls.items() if c != 1} == {}, "a side effect repeated"
            assert fx.input_of(run, "end") == {"check": 3, "any": fx.input_of(run, "any")}
            _assert_one_final_result(fleet, result)
            assert fleet.events_of("job:duplicate", run) or fleet.events_of("job:requeued", run), (
                "no job was delivered twice"
            )

    async def test_node_longer_than_its_lease_runs_once(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A node running for several lease periods keeps its lease by heartbeat: a
        second delivery of its job meanwhile is handed back, never run beside it."""
        if not self.supports_duplicate_injection:
            pytest.skip(f"{type(self).__name__}: the queue deduplicates messages")
        fx = SideEffects()
        lease = 0.6

        async def slow(ctx: NodeContext) -> str:
            await asyncio.sleep(lease * 3)
            return "slow"

        flow = Flow("lease").node("slow", fx.step(slow)).node("after", fx.step())
        flow.chain("slow", "after")
        async with self.fleet(adapter_factory, flow, lease_seconds=lease) as fleet:
            fleet.duplicate_enqueues = True
            result = await fleet.run("lease")
            assert result.status == "completed", result.errors
            assert fx.ran(result.run_id, "slow") == 1, "the lease lapsed under a live node"
            assert _outputs(result)["after"] == "slow"
            requeued = [e.node_id for e in fleet.events_of("job:requeued", result.run_id)]
            assert "slow" in requeued, "the second delivery never met the held lease"

    async def test_large_state_costs_deltas_only(self, adapter_factory: AdapterFactory) -> None:
        """With 1 MB in the state, later jobs patch and read only small deltas; only the
        finalization reads the whole state."""
        big = "x" * (1024 * 1024)

        async def load(ctx: NodeContext) -> str:
            await ctx.set("blob", big)
            return "loaded"

        async def step(ctx: NodeContext) -> int:
            await ctx.set(f"delta {ctx.node_id}", len(str(ctx.input)))
            return 1

        flow = Flow("bigstate").node("load", load)
        names = [f"n{i}" for i in range(4)]
        for name in names:
            flow.node(name, step)
        flow.chain("load", *names)
        async with self.fleet(adapter_factory, flow) as fleet:
            fleet.meter.reset()
            run = await fleet.client.start_run("bigstate")
            await fleet.until(lambda: fleet.published(run), "the final result")
            meter = fleet.meter
            big_patches = [b for b in meter.patch_bytes if b > len(big)]
            assert len(big_patches) == 1, "the 1 MB value was written more than once"
            small = sorted(b for b in meter.patch_bytes if b <= len(big))
            assert small, "no patches"
            assert small[-1] < 16 * 1024, f"a patch of {small[-1]} bytes after the big write"
            assert max(meter.read_bytes) < 16 * 1024, "a node job read the big value"
            assert meter.ops["to_dict"] == len(fleet.published(run)), (
                "the whole state was read outside finalization"
            )
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert result.context["blob"] == big
            assert [result.context[f"delta {n}"] for n in names] == [6, 1, 1, 1]

    # ---------------------------------------------------------------- operator API

    async def test_get_status(self, adapter_factory: AdapterFactory) -> None:
        """``get_status``: unknown before the start, running, then the final status."""
        gate = asyncio.Event()

        async def held(ctx: NodeContext) -> str:
            await gate.wait()
            return "released"

        flow = Flow("status").node("a", held).node("b", lambda c: c.input).chain("a", "b")
        async with self.fleet(adapter_factory, flow) as fleet:
            assert await fleet.status("status-run") == "unknown"
            run = await fleet.client.start_run("status", run_id="status-run")
            assert await fleet.status(run) == "running"
            gate.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed"
            info = await fleet.client.get_status(run)
            assert (info.status, info.errors, info.waiting) == ("completed", [], [])

    async def test_wait_for_result_timeout(self, adapter_factory: AdapterFactory) -> None:
        """``wait_for_result`` raises ``TimeoutError`` for a run that has not ended."""
        flow = Flow("paused").wait("w")
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("paused")
            with pytest.raises(TimeoutError):
                await fleet.client.wait_for_result(run, 0.2)
            assert await fleet.status(run) in {"running", "awaiting"}

    async def test_start_run_is_idempotent(self, adapter_factory: AdapterFactory) -> None:
        """Starting the same ``run_id`` twice makes one run."""
        fx = SideEffects()
        flow = Flow("once").node("a", fx.step(lambda c: 1))
        async with self.fleet(adapter_factory, flow) as fleet:
            first = await fleet.client.start_run("once", {"k": 1}, run_id="same")
            second = await fleet.client.start_run("once", {"k": 1}, run_id="same")
            assert first == second == "same"
            result = await fleet.client.wait_for_result("same", self.timeout_seconds)
            assert result.status == "completed"
            await fleet.until(
                lambda: (
                    len(fleet.events_of("job:processed", "same"))
                    + len(fleet.events_of("job:duplicate", "same"))
                    >= 2
                ),
                "both start jobs to be handled",
            )
            assert fx.calls["same:a:1"] == 1

    async def test_runs_are_isolated(self, adapter_factory: AdapterFactory) -> None:
        """Concurrent runs of one blueprint never see each other's state."""

        async def add(ctx: NodeContext) -> int:
            total = int(await ctx.get("total") or 0) + int(await ctx.get("step"))
            await ctx.set("total", total)
            return total

        flow = Flow("iso").node("a", add).node("b", add).node("c", add).chain("a", "b", "c")
        async with self.fleet(adapter_factory, flow) as fleet:
            runs = [await fleet.client.start_run("iso", {"step": i}) for i in range(1, 6)]
            results = [await fleet.client.wait_for_result(r, self.timeout_seconds) for r in runs]
            assert [r.context["total"] for r in results] == [3 * i for i in range(1, 6)]

    async def test_reconcile_redrives_lost_job(self, adapter_factory: AdapterFactory) -> None:
        """A run whose enqueued job was lost completes after ``reconcile``."""
        fx = SideEffects()
        flow = (
            Flow("lossy")
            .node("a", fx.step(lambda c: 1))
            .node("b", fx.step(lambda c: c.input + 1))
            .node("c", fx.step(lambda c: c.input + 1))
            .chain("a", "b", "c")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            fleet.drop_next_enqueue(lambda job: job.node_id == "b")
            run = await fleet.client.start_run("lossy")
            await fleet.until(lambda: fleet.dropped, "the job of b to be lost")
            await fleet.until(
                lambda: fleet.events_of("job:processed", run), "the job of a to be processed"
            )
            assert await fleet.status(run) == "running"
            assert await fleet.client.reconcile(run) >= 1
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result) == {"a": 1, "b": 2, "c": 3}
            assert set(fx.calls.values()) == {1}
            assert await fleet.client.reconcile(run) == 0


async def _is(status: Awaitable[str], expected: str) -> bool:
    return await status == expected


async def _has(messages: Awaitable[list[str]], text: str) -> bool:
    return any(text in m for m in await messages)


async def _count(messages: Awaitable[list[str]], n: int) -> bool:
    return len(await messages) >= n
