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
import functools
import inspect
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest

from flowcraft.context import AsyncContext, BaseAsyncContext, Guard, PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed.adapter import BaseDistributedAdapter, FinalResult
from flowcraft.distributed.payload import JobPayload
from flowcraft.errors import FlowcraftError
from flowcraft.events import CollectingEventBus, FlowEvent
from flowcraft.flow import Flow
from flowcraft.node import NodeContext, NodeResult, idempotency_key
from flowcraft.runtime import RuntimeOptions
from flowcraft.testing.compat import TypeScriptCompatTests
from flowcraft.testing.fidelity import ValueFidelityTests
from flowcraft.testing.store import _GUARD, _KIT_MODULE_PREFIX, _override_problems

__all__ = [
    "AdapterConformanceTests",
    "AdapterFactory",
    "ContextHook",
    "ContextMeter",
    "Fleet",
    "SideEffects",
    "StoreHook",
    "meter_contexts",
]

AdapterFactory = Callable[..., BaseDistributedAdapter | Awaitable[BaseDistributedAdapter]]
"""``factory(runtime_options, **options)``: a new worker on the test's backend."""

StoreHook = Callable[[str, str, str], Awaitable[None]]
"""``hook(phase, operation, key)`` around each coordination store operation of a fleet's
adapters: ``phase`` is ``before`` (raise: the request never reached the store, as in a
partition) or ``after`` (the operation took effect; sleep: a late reply; raise: a lost
one)."""

ContextHook = Callable[[str, str, Any], Awaitable[None]]
"""``hook(phase, operation, argument)`` around each run context operation of a fleet's
adapters: ``argument`` is the key (``get``, ``has``), the keys (``get_many``), the
operations (``patch``) or None (``to_dict``)."""

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


class _HookedContext(BaseAsyncContext):
    """Delegates to the adapter's context, calling the fleet's ``context_hook`` around
    each operation."""

    def __init__(self, inner: AsyncContext, fleet: Fleet) -> None:
        self._inner = inner
        self._fleet = fleet

    async def _hook(self, phase: str, operation: str, argument: Any) -> None:
        hook = self._fleet.context_hook
        if hook is not None:
            await hook(phase, operation, argument)

    async def get(self, key: str) -> Any:
        await self._hook("before", "get", key)
        value = await self._inner.get(key)
        await self._hook("after", "get", key)
        return value

    async def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        await self._hook("before", "get_many", keys)
        found = await self._inner.get_many(keys)
        await self._hook("after", "get_many", keys)
        return found

    async def has(self, key: str) -> bool:
        await self._hook("before", "has", key)
        found = await self._inner.has(key)
        await self._hook("after", "has", key)
        return found

    async def patch(self, ops: Sequence[PatchOperation], *, guard: Guard | None = None) -> bool:
        await self._hook("before", "patch", ops)
        applied = await (
            self._inner.patch(ops) if guard is None else self._inner.patch(ops, guard=guard)
        )
        await self._hook("after", "patch", ops)
        return applied

    async def to_dict(self) -> dict[str, Any]:
        await self._hook("before", "to_dict", None)
        state = await self._inner.to_dict()
        await self._hook("after", "to_dict", None)
        return state


class _HookedStore:
    """Delegates to the adapter's coordination store, calling the fleet's ``store_hook``
    around each of the five operations (anything else goes straight through)."""

    def __init__(self, inner: Any, fleet: Fleet) -> None:
        self._inner = inner
        self._fleet = fleet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _call(self, operation: str, key: str, call: Callable[[], Awaitable[Any]]) -> Any:
        hook = self._fleet.store_hook
        if hook is not None:
            await hook("before", operation, key)
        result = await call()
        if hook is not None:
            await hook("after", operation, key)
        return result

    async def increment(self, key: str, ttl_seconds: float) -> int:
        result: int = await self._call(
            "increment", key, lambda: self._inner.increment(key, ttl_seconds)
        )
        return result

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        result: bool = await self._call(
            "set_if_not_exist", key, lambda: self._inner.set_if_not_exist(key, value, ttl_seconds)
        )
        return result

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        result: bool = await self._call(
            "extend_ttl", key, lambda: self._inner.extend_ttl(key, ttl_seconds)
        )
        return result

    async def delete(self, key: str) -> None:
        await self._call("delete", key, lambda: self._inner.delete(key))

    async def get(self, key: str) -> str | None:
        result: str | None = await self._call("get", key, lambda: self._inner.get(key))
        return result


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
        self.store_hook: StoreHook | None = None
        """Called around every coordination store operation of the fleet's adapters."""
        self.context_hook: ContextHook | None = None
        """Called around every run context operation of the fleet's adapters."""
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

    async def restart(self) -> None:
        """Stop and close every worker (as if every worker process ended: what a
        closed adapter held, a consumer group's partitions say, is given up), then
        start as many new ones. A worker that died raises."""
        old = [a for a, _ in self._workers]
        await self.stop(old)
        for adapter in old:
            await adapter.aclose()
        await self.start(len(old))

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
        adapter.coordination_store = _HookedStore(adapter.coordination_store, self)
        create = adapter.create_context

        def create_context(run_id: str) -> AsyncContext:
            return _HookedContext(create(run_id), self)

        adapter.create_context = create_context  # type: ignore[method-assign]

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
class AdapterConformanceTests(ValueFidelityTests, TypeScriptCompatTests):
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
        self,
        factory: AdapterFactory,
        *flows: Flow,
        workers: int | None = None,
        gates: Iterable[asyncio.Event] = (),
        **options: Any,
    ) -> AsyncIterator[Fleet]:
        """A started fleet running ``flows``; stopped (and checked alive) on exit, after
        opening ``gates`` (events nodes wait on), so a failing test cannot hang it."""
        fleet = Fleet(factory, RuntimeOptions.from_flows(*flows), timeout=self.timeout_seconds)
        await fleet.start(self.worker_count if workers is None else workers, **options)
        try:
            yield fleet
            assert fleet.dead_workers() == [], "a worker died"
        finally:
            for gate in gates:
                gate.set()
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

    # ---------------------------------------------------------------- fenced commits (issue 12)
    #
    # Each scenario below failed on the protocol before the guarded patch; the docstring
    # says how. They drive the fleet through its hooks: ``store_hook`` cuts a worker off
    # the coordination store (a partition) or delays replies, ``context_hook`` holds a
    # context operation back until the test lets it through.

    async def test_stale_worker_cannot_commit_after_a_partitioned_heartbeat(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 1. A worker whose heartbeat cannot reach the store for two lease periods
        loses the activation to another delivery, which commits and the run moves on.
        When its link returns it must not commit over that delivery's output. (Before:
        its heartbeat extended the other delivery's lease, which named no holder, its
        lease check trusted that, and it committed ``stale`` over ``fresh``.)"""
        if not self.supports_duplicate_injection:
            pytest.skip(f"{type(self).__name__}: the queue deduplicates messages")
        lease, run = 0.6, "partitioned-heartbeat"
        fx = SideEffects()
        started, release, hold = asyncio.Event(), asyncio.Event(), asyncio.Event()
        partitioned = False
        executions: list[str] = []

        async def x(ctx: NodeContext) -> str:
            nonlocal partitioned
            executions.append(ctx.idempotency_key)
            if len(executions) == 1:
                started.set()
                await release.wait()
                return "stale"
            partitioned = False  # the stale worker's link comes back now
            return "fresh"

        async def held(ctx: NodeContext) -> Any:
            await hold.wait()
            return ctx.input

        flow = Flow("partition").node("x", x).node("y", fx.step()).node("hold", held)
        flow.chain("x", "y", "hold")
        gates = (release, hold)
        async with self.fleet(adapter_factory, flow, lease_seconds=lease, gates=gates) as fleet:
            lease_key = K.lease(fleet.client.key_prefix, run, "x", 1)

            async def partition(phase: str, operation: str, key: str) -> None:
                cut = operation in ("extend_ttl", "get") and key == lease_key
                if partitioned and phase == "before" and cut:
                    raise ConnectionError("partitioned from the coordination store")

            fleet.store_hook = partition
            await fleet.client.start_run("partition", run_id=run)
            await _wait(started, self.timeout_seconds, "the first execution of x")
            partitioned = True
            await fleet.client.enqueue_job(_job(run, "partition", "x"))
            await fleet.until(lambda: fx.ran(run, "y"), "another delivery to take over x")
            await asyncio.sleep(lease)  # the stale worker's heartbeat beats again
            release.set()
            await fleet.until(
                lambda: _handled(fleet, run, "x") >= 2, "the stale delivery of x to end"
            )
            hold.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert fx.input_of(run, "y") == "fresh"
            assert _outputs(result)["x"] == "fresh", "a stale worker committed over the run"
            assert await fleet.client.create_context(run).get("_outputs.x") == "fresh"
            _assert_one_final_result(fleet, result)

    async def test_late_lease_reply_cannot_rewind_a_loop(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 2. A worker whose heartbeat is cut off checks its lease before committing;
        the reply confirming it arrives after the lease expired, another delivery ran
        the activation and the loop went on. The late confirmation must not let it
        commit: the loop's resolved count never goes back. (Before: it committed
        iteration 1 again after iteration 4, and iterations 2-4 ran a second time.)"""
        if not self.supports_duplicate_injection:
            pytest.skip(f"{type(self).__name__}: the queue deduplicates messages")
        lease, late, run = 0.6, 3.0, "late-reply"
        fx = SideEffects()
        started, looped, hold = asyncio.Event(), asyncio.Event(), asyncio.Event()
        returned = False
        one_extension = True
        bodies = 0

        async def body(ctx: NodeContext) -> int:
            nonlocal returned, bodies
            bodies += 1
            first = bodies == 1
            n = int(await ctx.get("n") or 0) + 1
            await ctx.set("n", n)
            if first:
                started.set()
                await asyncio.sleep(0.7 * lease)  # past half its lease, with no heartbeat
                returned = True
            return n

        async def held(ctx: NodeContext) -> Any:
            looped.set()
            await hold.wait()
            return ctx.input

        flow = (
            Flow("rewind")
            .node("init", fx.step(lambda c: 0))
            .node("body", fx.step(body))
            .node("check", fx.step())
            .node("hold", held)
            .chain("init", "body", "check")
            .loop("body", "check", while_="n < 4")
            .edge("check", "hold")
        )
        async with self.fleet(adapter_factory, flow, lease_seconds=lease, gates=[hold]) as fleet:
            lease_key = K.lease(fleet.client.key_prefix, run, "body", 1)

            async def late_replies(phase: str, operation: str, key: str) -> None:
                nonlocal one_extension
                if key != lease_key:
                    return
                if operation == "extend_ttl" and phase == "before":
                    if returned and one_extension:  # the lease check gets through
                        one_extension = False
                        return
                    raise ConnectionError("the heartbeat cannot reach the store")
                if operation == "get" and phase == "after" and returned:
                    await asyncio.sleep(late)  # the confirmation arrives late

            fleet.store_hook = late_replies
            await fleet.client.start_run("rewind", run_id=run)
            await _wait(started, self.timeout_seconds, "the first execution of body")
            await fleet.client.enqueue_job(_job(run, "rewind", "body"))
            await _wait(looped, self.timeout_seconds, "the loop to finish")
            await asyncio.sleep(late + 2 * lease)  # any stale commit has landed by now
            hold.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert result.context["n"] == 4
            assert fx.keys(run, "body") == [idempotency_key(run, "body", i) for i in range(1, 5)]
            repeated = {k: c for k, c in fx.calls.items() if c != 1}
            assert repeated == {}, f"iterations ran again after a rewind: {repeated}"
            assert await fleet.client.create_context(run).get(K.resolved("body")) == 4

    async def test_failed_queue_attempt_never_frees_another_deliverys_lease(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 3. In queue retry mode a failed attempt frees the activation for the
        next delivery, but only its own lease: when another delivery has taken over
        meanwhile, a third must not run beside it, and the activation resolves once.
        (Before: the lease was deleted unconditionally, a third delivery ran and
        committed ``C`` after ``B`` had been committed and consumed by ``g``.)"""
        if not (self.supports_queue_retry and self.supports_duplicate_injection):
            pytest.skip(f"{type(self).__name__}: no queue retries or no duplicate injection")
        lease, run = 0.6, "queue-lease"
        fx = SideEffects()
        a_started, a_fails, b_started, b_commits = (asyncio.Event() for _ in range(4))
        c_started, c_commits, hold = (asyncio.Event() for _ in range(3))
        partitioned = False
        executions = 0

        async def f(ctx: NodeContext) -> str:
            nonlocal executions, partitioned
            executions += 1
            if executions == 1:
                a_started.set()
                await a_fails.wait()
                raise _Boom("attempt failed")
            if executions == 2:
                partitioned = False
                b_started.set()
                await b_commits.wait()
                return "B"
            c_started.set()
            await c_commits.wait()
            return "C"

        async def held(ctx: NodeContext) -> Any:
            await hold.wait()
            return ctx.input

        flow = Flow("qlease").node("f", f, max_retries=2).node("g", fx.step())
        flow.node("hold", held).chain("f", "g", "hold")
        options = {**self.queue_retry_options, "lease_seconds": lease}
        gates = (a_fails, b_commits, c_commits, hold)
        async with self.fleet(adapter_factory, flow, gates=gates, **options) as fleet:
            lease_key = K.lease(fleet.client.key_prefix, run, "f", 1)

            async def partition(phase: str, operation: str, key: str) -> None:
                cut = operation in ("extend_ttl", "get") and key == lease_key
                if partitioned and phase == "before" and cut:
                    raise ConnectionError("partitioned from the coordination store")

            fleet.store_hook = partition
            await fleet.client.start_run("qlease", run_id=run)
            await _wait(a_started, self.timeout_seconds, "the first attempt")
            partitioned = True
            await fleet.client.enqueue_job(_job(run, "qlease", "f"))
            await _wait(b_started, self.timeout_seconds, "another delivery to take over")
            a_fails.set()
            await fleet.until(
                lambda: any("attempt" in _reason(e) for e in _requeued(fleet, run, "f")),
                "the failed attempt to be handed back",
            )
            busy = sum("elsewhere" in _reason(e) for e in _requeued(fleet, run, "f"))
            await fleet.client.enqueue_job(_job(run, "qlease", "f"))
            await fleet.until(
                lambda: (
                    c_started.is_set()
                    or sum("elsewhere" in _reason(e) for e in _requeued(fleet, run, "f")) > busy
                ),
                "a third delivery to run f or meet the held lease",
            )
            b_commits.set()
            await fleet.until(lambda: fx.ran(run, "g"), "g to run on B's output")
            c_commits.set()
            await asyncio.sleep(2 * lease)  # a third execution, if any, has committed
            hold.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert fx.input_of(run, "g") == "B"
            assert _outputs(result)["f"] == "B", "a second execution committed over f"

    async def test_concurrent_resumes_exactly_one_applies(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 4. Two resumes of one wait (approve and reject) at once: exactly one is
        applied, the other raises ``RunConflictError``; one branch runs. (Before: both
        were accepted, both branches ran and the join got both inputs.)"""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        flow = (
            Flow("tworesumes")
            .wait("review")
            .node("publish", fx.step(lambda c: "published"))
            .node("discard", fx.step(lambda c: "discarded"))
            .node("end", fx.step())
            .edge("review", "publish", action="approve")
            .edge("review", "discard", action="reject")
            .edge("publish", "end")
            .edge("discard", "end")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("tworesumes")
            await fleet.until(lambda: _is(fleet.status(run), "awaiting"), "the run to pause")
            outcomes = await asyncio.gather(
                fleet.client.resume_with_action(run, "approve", output="yes"),
                fleet.client.resume_with_action(run, "reject", output="no"),
                return_exceptions=True,
            )
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            assert len(errors) == 1, f"expected one refused resume, got {outcomes}"
            assert isinstance(errors[0], RunConflictError), errors[0]
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert fx.ran(run, "publish") + fx.ran(run, "discard") == 1
            assert len(fx.input_of(run, "end")) == 1, "the join got both branches"
            _assert_one_final_result(fleet, result)

    async def test_duplicate_wait_job_straddling_a_resume_does_not_pause_again(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 5. A duplicate of a wait node's job reads the run before the node
        paused, is held up, and reaches its own pause after the run was resumed: the
        pause must be refused, and a second resume with it. (Before: the run paused
        again and the second resume was accepted, resolving the wait twice.)"""
        if not self.supports_duplicate_injection:
            pytest.skip(f"{type(self).__name__}: the queue deduplicates messages")
        lease, run = 0.6, "straddle"
        fx = SideEffects()
        second_read, second_pausing, resumed = (asyncio.Event() for _ in range(3))
        reads = pauses = 0
        # The handler's second read (the activation record and the wait mark): after it
        # the duplicate knows the wait pending and not paused.
        second = [K.activation("w", 1), K.waiting("w")]

        async def straddle(phase: str, operation: str, argument: Any) -> None:
            nonlocal reads, pauses
            if operation == "get_many" and phase == "after" and list(argument)[:2] == second:
                reads += 1
                if reads == 2:
                    second_read.set()
                    await asyncio.sleep(1.5 * lease)  # past the first delivery's lease
            pausing = operation == "patch" and phase == "before"
            if pausing and any(op.key == "_flowcraft.w.w" and op.op == "set" for op in argument):
                pauses += 1
                if pauses == 1:
                    await second_read.wait()
                else:
                    second_pausing.set()
                    await resumed.wait()

        flow = (
            Flow("straddle")
            .wait("w")
            .node("yes", fx.step())
            .node("no", fx.step())
            .edge("w", "yes", action="approve")
            .edge("w", "no", action="reject")
        )
        gates = (second_read, resumed)
        async with self.fleet(adapter_factory, flow, lease_seconds=lease, gates=gates) as fleet:
            fleet.context_hook = straddle
            await fleet.client.start_run("straddle", run_id=run)
            await fleet.client.enqueue_job(_job(run, "straddle", "w"))
            await fleet.until(lambda: _is(fleet.status(run), "awaiting"), "the run to pause")
            await _wait(second_pausing, self.timeout_seconds, "the duplicate to reach its pause")
            await fleet.client.resume_with_action(run, "approve", output="ok")
            resumed.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            await fleet.until(lambda: _handled(fleet, run, "w") >= 2, "the duplicate to end")
            info = await fleet.client.get_status(run)
            assert info.waiting == [], "the duplicate paused the run again"
            with pytest.raises(FlowcraftError):
                await fleet.client.resume_with_action(run, "reject", output="again")
            assert fx.ran(run, "no") == 0
            assert fx.ran(run, "yes") == 1

    async def test_late_start_retry_changes_nothing(self, adapter_factory: AdapterFactory) -> None:
        """Item 6. A retried ``start_run`` of the same request whose write arrives after
        the run began is a no-op (it returns the run id); a start of another blueprint,
        or other initial context, with that run id raises ``RunConflictError`` and
        changes nothing. (Before: the late start rewrote keys a node had committed,
        and a colliding start rewrote the run's blueprint.)"""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        run = "late-start"
        held_back, let_through, hold = asyncio.Event(), asyncio.Event(), asyncio.Event()
        reading = asyncio.Event()
        starts = 0

        async def writer(ctx: NodeContext) -> str:
            await ctx.set("k", "written by a")
            return "a"

        async def reader(ctx: NodeContext) -> Any:
            reading.set()
            await hold.wait()
            return await ctx.get("k")

        async def late(phase: str, operation: str, argument: Any) -> None:
            nonlocal starts
            starting = operation == "patch" and phase == "before"
            if starting and any(op.key == "_flowcraft.meta" for op in argument):
                starts += 1
                if starts == 1:  # the first start's write is held back
                    held_back.set()
                    await let_through.wait()

        flow = Flow("late").node("a", fx.step(writer)).node("b", fx.step(reader)).chain("a", "b")
        other = Flow("other").node("z", fx.step())
        async with self.fleet(adapter_factory, flow, other, gates=(let_through, hold)) as fleet:
            fleet.context_hook = late
            first = asyncio.ensure_future(fleet.client.start_run("late", {"k": "init"}, run_id=run))
            await _wait(held_back, self.timeout_seconds, "the first start's write")
            assert await fleet.client.start_run("late", {"k": "init"}, run_id=run) == run
            await _wait(reading, self.timeout_seconds, "a to commit and b to start")
            let_through.set()
            assert await first == run
            held_back.clear()
            let_through.clear()
            starts = 0
            colliding = asyncio.ensure_future(fleet.client.start_run("other", {}, run_id="other"))
            await _wait(held_back, self.timeout_seconds, "the colliding start's write")
            await fleet.client.start_run("late", {"k": "init"}, run_id="other")
            let_through.set()
            with pytest.raises(RunConflictError):
                await colliding
            with pytest.raises(RunConflictError):
                await fleet.client.start_run("late", {"k": "changed"}, run_id=run)
            with pytest.raises(RunConflictError):
                await fleet.client.start_run("other", {}, run_id=run)
            hold.set()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert result.context["k"] == "written by a", "a late start rewrote committed state"
            assert _outputs(result)["b"] == "written by a"
            again = await fleet.client.wait_for_result("other", self.timeout_seconds)
            assert again.status == "completed", again.errors
            assert set(_outputs(again)) == {"a", "b"}, "a colliding start changed the blueprint"
            assert fx.ran("other", "z") == 0
            assert {k: c for k, c in fx.calls.items() if c != 1} == {}

    async def test_rolling_deploy_hands_new_nodes_back(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 8. A worker of an older blueprint version gets a job for a node only the
        newer version has: it hands the job back (the run's version is checked before
        the node), and a newer worker completes the run. (Before: the older worker
        dead-lettered it as an unknown node and the run stayed running.)"""
        fx = SideEffects()

        def versioned(version: str, extra: bool) -> Flow:
            flow = Flow("deploy", version=version).node("a", fx.step(lambda c: f"v{version}"))
            if extra:
                flow.node("new", fx.step()).chain("a", "new")
            return flow

        fleet = Fleet(
            adapter_factory,
            RuntimeOptions.from_flows(versioned("2", True)),
            timeout=self.timeout_seconds,
        )
        try:
            await fleet.start(1, RuntimeOptions.from_flows(versioned("1", False)))
            run = await fleet.client.start_run("deploy")
            await fleet.client.enqueue_job(_job(run, "deploy", "new"))
            await fleet.until(
                lambda: any("version" in _reason(e) for e in _requeued(fleet, run, "new")),
                "the older worker to hand the new node's job back",
            )
            failed = [e for e in fleet.events_of("job:failed", run) if e.node_id == "new"]
            assert failed == [], f"the older worker gave up the job: {failed}"
            await fleet.start(1)
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result) == {"a": "v2", "new": "v2"}
            if self.supports_dead_letter:
                assert not await _has(self.dead_letters(fleet.client), "'new'")
            assert fleet.dead_workers() == []
        finally:
            await fleet.stop()

    async def test_writing_a_reserved_key_fails_the_node(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 9. A node writing a ``_flowcraft.*`` key fails, after its attempts, with
        an error naming the key, and the run fails once. (Before: the job was handed
        back forever and the run never ended.)"""
        attempts: list[int] = []

        async def meddler(ctx: NodeContext) -> str:
            attempts.append(ctx.attempt)
            await ctx.set("_flowcraft.status", {"status": "completed", "errors": []})
            return "meddled"

        flow = Flow("meddle").node("m", meddler, max_retries=2).node("after", lambda c: 1)
        flow.chain("m", "after")
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("meddle")
            assert result.status == "failed"
            assert [e["nodeId"] for e in result.errors] == ["m"]
            assert "_flowcraft.status" in result.errors[0]["message"]
            assert "reserved" in result.errors[0]["message"]
            assert "_outputs.after" not in result.context
            _assert_one_final_result(fleet, result)

    async def test_oversized_activation_record_fails_the_run_once(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 10. A join's activation record (written by the follow-up of its last
        branch, holding every branch's handed value) past the store's state limit
        fails the run once with the reason, also when the follow-up is a redelivery's
        (the first try met an outage). The limit is played by the fleet's context
        hook, as a store would refuse the patch. (Before: on that path the job was
        dead-lettered and the run stayed running.)"""
        from flowcraft.errors import StateLimitError

        limit = 10_000
        refusals = 0

        async def refuse_big_records(phase: str, operation: str, argument: Any) -> None:
            nonlocal refusals
            if operation != "patch" or phase != "before":
                return
            for op in argument:
                size = len(json.dumps(op.value))
                if op.key.startswith("_flowcraft.a.") and op.op == "set" and size > limit:
                    refusals += 1
                    if refusals == 1:  # the first try dies: its redelivery follows up
                        raise ConnectionError("the store is unreachable")
                    raise StateLimitError(f"record of {size} bytes: the limit is {limit}")

        flow = Flow("bigjoin").node("s", lambda c: 1).node("j", lambda c: "joined")
        for i in range(3):
            flow.node(f"b{i}", lambda c: "x" * 4_000)
            flow.edge("s", f"b{i}").edge(f"b{i}", "j", transform="input")
        async with self.fleet(adapter_factory, flow) as fleet:
            fleet.context_hook = refuse_big_records
            result = await fleet.run("bigjoin")
            assert result.status == "failed"
            assert [e["nodeId"] for e in result.errors] == ["j"], result.errors
            assert "state limit" in result.errors[0]["message"]
            assert "_outputs.j" not in result.context
            _assert_one_final_result(fleet, result)
            assert await fleet.status(result.run_id) == "failed"

    async def test_job_for_another_blueprints_run_is_dead_lettered(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Item 11. A job naming a blueprint the worker knows, for a run of another
        blueprint, is dead-lettered with the reason; the run is unaffected. (Before: it
        was handed back forever, tens of thousands of times a second.)"""
        flow = Flow("mine").node("a", lambda c: "a").node("b", lambda c: "b").chain("a", "b")
        theirs = Flow("theirs").node("a", lambda c: "not mine")
        async with self.fleet(adapter_factory, flow, theirs) as fleet:
            result = await fleet.run("mine", run_id="owned")
            assert result.status == "completed", result.errors
            await fleet.client.enqueue_job(_job("owned", "theirs", "a"))
            await fleet.until(
                lambda: fleet.events_of("job:failed", "owned"), "the stray job to be refused"
            )
            (report,) = fleet.events_of("job:failed", "owned")
            assert "'theirs'" in report.data["error"]
            assert "'mine'" in report.data["error"]
            if self.supports_dead_letter:
                await fleet.until(
                    lambda: _has(self.dead_letters(fleet.client), "'theirs'"),
                    "the stray job to be dead-lettered",
                )
            requeued = fleet.events_of("job:requeued", "owned")
            assert len(requeued) < 5, f"the stray job was handed back {len(requeued)} times"
            assert _outputs(await fleet.client.wait_for_result("owned", 1)) == {"a": "a", "b": "b"}

    async def test_idempotency_keys_are_unambiguous(self, adapter_factory: AdapterFactory) -> None:
        """Item 12. Run ``order:1`` node ``charge`` and run ``order`` node ``1:charge``
        have different idempotency keys. (Before: both were ``order:1:charge:1``.)"""
        keys: list[str] = []

        def record(ctx: NodeContext) -> str:
            keys.append(ctx.idempotency_key)
            return ctx.idempotency_key

        flow = Flow("ids").node("charge", record).node("1:charge", record)
        async with self.fleet(adapter_factory, flow) as fleet:
            for run in ("order:1", "order"):
                result = await fleet.run("ids", run_id=run)
                assert result.status == "completed", result.errors
            assert len(keys) == 4
            assert len(set(keys)) == 4, f"two activations share a key: {sorted(keys)}"
            assert idempotency_key("order", "1:charge", 1) != idempotency_key(
                "order:1", "charge", 1
            )

    async def test_busy_hand_backs_are_not_attempts(self, adapter_factory: AdapterFactory) -> None:
        """Item 13. In queue retry mode only failed executions count as attempts: a
        duplicate that meets the held lease and is handed back does not use one up.
        Here the first two executions fail and the third of three succeeds. (Before:
        the in-memory queue counted the hand-backs, the second execution ran as the
        last attempt and its failure failed the run.)"""
        if not (self.supports_queue_retry and self.supports_duplicate_injection):
            pytest.skip(f"{type(self).__name__}: no queue retries or no duplicate injection")
        lease = 0.6
        executions: list[int] = []

        async def flaky(ctx: NodeContext) -> str:
            executions.append(ctx.attempt)
            await asyncio.sleep(lease)  # long enough for the duplicate to meet the lease
            if len(executions) <= 2:
                raise _Boom(f"execution {len(executions)} fails")
            return "third time"

        flow = Flow("busy").node("f", flaky, max_retries=3).node("g", lambda c: c.input)
        flow.chain("f", "g")
        options = {**self.queue_retry_options, "lease_seconds": lease}
        async with self.fleet(adapter_factory, flow, **options) as fleet:
            fleet.duplicate_enqueues = True
            result = await fleet.run("busy")
            assert result.status == "completed", (result.errors, executions)
            assert _outputs(result)["g"] == "third time"
            assert any("elsewhere" in _reason(e) for e in _requeued(fleet, result.run_id, "f"))

    # ---------------------------------------------------------------- cancellation

    async def test_cancel_stops_a_running_run(self, adapter_factory: AdapterFactory) -> None:
        """``cancel_run``: the run ends ``cancelled`` once; the running node sees its
        cancellation (at its next await, within a heartbeat); queued jobs drop
        themselves; ``wait_for_result`` returns the cancelled result."""
        lease = 0.6
        fx = SideEffects()
        started = asyncio.Event()
        seen: list[str] = []

        async def slow(ctx: NodeContext) -> str:
            started.set()
            try:
                await asyncio.sleep(self.timeout_seconds * 2)
            except asyncio.CancelledError:
                seen.append("cancelled" if ctx.is_cancelled else "cancelled without the flag")
                raise
            return "finished"

        flow = Flow("cancel").node("slow", slow).node("after", fx.step()).chain("slow", "after")
        async with self.fleet(adapter_factory, flow, lease_seconds=lease) as fleet:
            run = await fleet.client.start_run("cancel")
            await _wait(started, self.timeout_seconds, "the node to run")
            status = await fleet.client.cancel_run(run, "changed my mind")
            assert status == "cancelled"
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "cancelled"
            assert "changed my mind" in json.dumps(result.errors)
            await fleet.until(lambda: seen, "the running node to see its cancellation")
            assert seen == ["cancelled"]
            await fleet.client.enqueue_job(_job(run, "cancel", "after"))
            await fleet.until(lambda: _handled(fleet, run, "after") >= 1, "the queued job")
            assert fx.ran(run, "after") == 0, "a job ran after the cancel"
            assert await fleet.status(run) == "cancelled"
            assert await fleet.client.cancel_run(run, "again") == "cancelled"
            assert [p.status for p in fleet.published(run)] in (["cancelled"], ["cancelled"] * 2)

    async def test_cancel_racing_completion_gives_one_final_status(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A cancel racing the run's last node: exactly one final status, which the
        cancel returns, the publications agree on and ``get_status`` reports."""
        gates: dict[str, asyncio.Event] = {}

        async def last(ctx: NodeContext) -> str:
            await gates[ctx.run_id].wait()
            return "done"

        flow = Flow("race").node("a", lambda c: 1).node("last", last).chain("a", "last")
        async with self.fleet(adapter_factory, flow) as fleet:
            outcomes: set[str] = set()
            for i in range(6):
                run = f"race-{i}"
                gates[run] = asyncio.Event()
                await fleet.client.start_run("race", run_id=run)
                await fleet.until(functools.partial(_handled, fleet, run, "a"), "node a")
                gates[run].set()
                await asyncio.sleep(0.002 * i)
                status = await fleet.client.cancel_run(run, "race")
                result = await fleet.client.wait_for_result(run, self.timeout_seconds)
                assert result.status == status, (result.status, status)
                assert await fleet.status(run) == status
                statuses = {p.status for p in fleet.published(run)}
                assert statuses == {status}, statuses
                outcomes.add(status)
            assert outcomes <= {"cancelled", "completed"}

    async def test_cancel_a_waiting_run(self, adapter_factory: AdapterFactory) -> None:
        """A run paused at a wait can be cancelled; a later resume is refused."""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        flow = Flow("waitcancel").wait("w").node("after", fx.step()).chain("w", "after")
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("waitcancel")
            await fleet.until(lambda: _is(fleet.status(run), "awaiting"), "the run to pause")
            assert await fleet.client.cancel_run(run) == "cancelled"
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "cancelled"
            with pytest.raises(RunConflictError):
                await fleet.client.resume_with_action(run, "go")
            assert await fleet.status(run) == "cancelled"
            assert fx.ran(run, "after") == 0

    async def test_cancel_a_finished_run_changes_nothing(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Cancelling a run that ended returns its status and changes nothing; an
        unknown run is an error."""
        flow = Flow("done").node("a", lambda c: "a")
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("done")
            assert result.status == "completed"
            assert await fleet.client.cancel_run(result.run_id) == "completed"
            assert await fleet.status(result.run_id) == "completed"
            again = await fleet.client.wait_for_result(result.run_id, self.timeout_seconds)
            assert again.to_json_dict() == result.to_json_dict()
            # Nothing else published: a duplicate delivery of the last job may publish the
            # same result again (every finalizer of a completed run publishes the same),
            # never another one.
            for published in fleet.published(result.run_id):
                assert published.to_json_dict() == result.to_json_dict()
            with pytest.raises(FlowcraftError):
                await fleet.client.cancel_run("no-such-run")

    # ---------------------------------------------------------------- timers and signals

    async def test_sleep_survives_a_restart_of_every_worker(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A durable sleep holds no worker: its due time is in the run's state and its
        job waits in the queue. Every worker stops while it sleeps; new ones finish the
        run, after the due time, with the sleep resolved once."""
        fx = SideEffects()
        flow = (
            Flow("nap")
            .node("a", fx.step(lambda c: "rested"))
            .sleep("nap", 1000)
            .node("b", fx.step(lambda c: {"input": c.input, "at": time.time()}))
            .chain("a", "nap", "b")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("nap")
            await fleet.until(lambda: fleet.events_of("node:sleep", run), "the sleep to start")
            until = fleet.events_of("node:sleep", run)[0].data["until"]
            assert fx.ran(run, "b") == 0, "the sleep ended before its due time"
            await fleet.restart()
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            out = _outputs(result)["b"]
            assert out["input"] == "rested"
            assert out["at"] >= until, "the run went on before the sleep was due"
            assert fx.ran(run, "b") == 1
            assert len(fleet.events_of("node:sleep", run)) == 1
            assert len(fleet.events_of("node:wake", run)) == 1
            assert not any(k.startswith(K.timer("")) for k in await _state(fleet, run))
            _assert_one_final_result(fleet, result)

    async def test_signal_racing_its_wait(self, adapter_factory: AdapterFactory) -> None:
        """A signal sent while the run is still on its way to the wait is refused
        (``RunConflictError``: signals are not buffered); the sender repeats it until
        it is accepted, exactly once, and every repeat after that is a duplicate."""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        order = f"o-{uuid.uuid4().hex}"
        flow = (
            Flow("pay")
            .node("order", fx.step(lambda c: {"id": order}))
            .wait_for("payment", "paid", token_from="input.id")  # noqa: S106
            .node("ship", fx.step(lambda c: f"shipped with {c.input['ref']}"))
            .chain("order", "payment", "ship")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("pay", run_id=f"pay-{uuid.uuid4().hex}")
            accepted, refused = 0, 0
            async with asyncio.timeout(self.timeout_seconds):
                while True:
                    try:
                        if await fleet.client.signal(run, "paid", {"ref": "tx-1"}):
                            accepted += 1
                            break
                    except RunConflictError:
                        refused += 1
                    await asyncio.sleep(0.005)
            assert accepted == 1
            assert await fleet.client.signal(run, "paid", {"ref": "tx-1"}) is False
            assert await fleet.client.signal(order, "paid", {"ref": "tx-1"}) is False
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result)["ship"] == "shipped with tx-1"
            assert fx.ran(run, "ship") == 1
            assert len(fleet.events_of("node:signal", run)) == 1
            _assert_one_final_result(fleet, result)

    async def test_duplicate_signals_resume_once(self, adapter_factory: AdapterFactory) -> None:
        """The same signal sent twice at once (by token and by run id): one resumes the
        wait, the other is told it is a duplicate; a different signal after it is
        refused. The wait's successor runs once, with the payload."""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        token = f"order-{uuid.uuid4().hex}"
        flow = (
            Flow("dupsig")
            .wait_for("hook", "webhook", token=token)
            .node("handle", fx.step(lambda c: c.input["n"]))
            .chain("hook", "handle")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("dupsig")
            await fleet.until(lambda: fleet.events_of("node:awaiting", run), "the wait")
            outcomes = await asyncio.gather(
                fleet.client.signal(token, "webhook", {"n": 1}),
                fleet.client.signal(run, "webhook", {"n": 1}),
            )
            assert sorted(outcomes) == [False, True], outcomes
            with pytest.raises(RunConflictError):
                await fleet.client.signal(run, "webhook", {"n": 2})
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert _outputs(result)["handle"] == 1
            assert fx.ran(run, "handle") == 1
            assert len(fleet.events_of("node:signal", run)) == 1

    async def test_wait_timeout_takes_the_timeout_edge(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """An event wait that nobody signals resolves by itself once its timeout is due,
        with the action ``timeout``: the timeout edge is taken, the other is not, and a
        signal after it is refused."""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        flow = (
            Flow("expiry")
            .wait_for("confirm", "confirmed", timeout=600)
            .node("done", fx.step(lambda c: "confirmed"))
            .node("expired", fx.step(lambda c: {"at": time.time()}))
            .edge("confirm", "done")
            .edge("confirm", "expired", action="timeout")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("expiry")
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            (paused,) = fleet.events_of("node:awaiting", run)
            assert _outputs(result)["expired"]["at"] >= paused.data["timeoutAt"]
            assert fx.ran(run, "done") == 0
            assert fx.ran(run, "expired") == 1
            assert len(fleet.events_of("node:timeout", run)) == 1
            with pytest.raises(RunConflictError):
                await fleet.client.signal(run, "confirmed", None)

    async def test_signal_racing_the_timeout_one_wins(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """A signal sent right when the wait's timeout is due: exactly one of them
        resolves the wait (the loser is refused), and only its branch runs."""
        from flowcraft.distributed.adapter import RunConflictError

        fx = SideEffects()
        flow = (
            Flow("photo")
            .wait_for("w", "go", timeout=500)
            .node("signalled", fx.step())
            .node("timedout", fx.step())
            .edge("w", "signalled")
            .edge("w", "timedout", action="timeout")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            run = await fleet.client.start_run("photo")
            await fleet.until(lambda: fleet.events_of("node:awaiting", run), "the wait")
            due = fleet.events_of("node:awaiting", run)[0].data["timeoutAt"]
            await asyncio.sleep(max(0.0, due - time.time()))
            try:
                won = await fleet.client.signal(run, "go", "now")
            except RunConflictError:
                won = False
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert fx.ran(run, "signalled") == (1 if won else 0)
            assert fx.ran(run, "timedout") == (0 if won else 1)
            assert (
                len(fleet.events_of("node:signal", run)) + len(fleet.events_of("node:timeout", run))
                == 1
            )


async def _state(fleet: Fleet, run_id: str) -> dict[str, Any]:
    return await fleet.client.create_context(run_id).to_dict()


async def _is(status: Awaitable[str], expected: str) -> bool:
    return await status == expected


async def _has(messages: Awaitable[list[str]], text: str) -> bool:
    return any(text in m for m in await messages)


async def _count(messages: Awaitable[list[str]], n: int) -> bool:
    return len(await messages) >= n


async def _wait(event: asyncio.Event, seconds: float, what: str) -> None:
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        pytest.fail(f"timed out after {seconds} s waiting for {what}")


def _job(run_id: str, blueprint_id: str, node_id: str) -> JobPayload:
    return JobPayload(run_id=run_id, blueprint_id=blueprint_id, node_id=node_id)


def _handled(fleet: Fleet, run_id: str, node_id: str) -> int:
    """Deliveries of ``node_id``'s jobs that ended (acked or dead-lettered)."""
    return sum(
        1
        for kind in ("job:processed", "job:failed")
        for e in fleet.events_of(kind, run_id)
        if e.node_id == node_id
    )


def _requeued(fleet: Fleet, run_id: str, node_id: str) -> list[FlowEvent]:
    return [e for e in fleet.events_of("job:requeued", run_id) if e.node_id == node_id]


def _reason(event: FlowEvent) -> str:
    return str(event.data.get("reason", ""))
