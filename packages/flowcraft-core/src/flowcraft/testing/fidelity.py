"""Conformance scenarios for values: what a node writes comes back exactly, and a
value no store can keep fails its own run (with a reason naming the key), never
another run, never a worker, and never leaves a run ``running``.

:class:`ValueFidelityTests` is a base of
:class:`~flowcraft.testing.AdapterConformanceTests`, so every adapter's kit runs
these on its real backend. It relies on the kit's ``fleet``, ``enqueue_raw``,
``dead_letters`` and flags.

What "exactly" means (see :mod:`flowcraft.serializer`): ints of any size stay ints,
floats keep their ``repr`` (``1e16`` is not ``10000000000000000``, ``-0.0`` keeps
its sign, ``1.0`` stays a float), strings keep every code point (astral ones, NUL
and other controls, the empty string), keys may be empty, and containers nest up to
``MAX_DEPTH``. A value beyond that (a lone surrogate, deeper nesting, NaN) either
round-trips exactly as well (the in-memory adapter keeps Python objects) or fails
its node once with a :class:`~flowcraft.errors.SerializationError` naming the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from flowcraft.flow import Flow
from flowcraft.node import NodeContext
from flowcraft.runtime import RuntimeOptions
from flowcraft.serializer import MAX_DEPTH

if TYPE_CHECKING:
    from flowcraft.distributed.adapter import BaseDistributedAdapter, FinalResult
    from flowcraft.testing.adapter import AdapterFactory, Fleet

__all__ = ["EXACT_KEYS", "EXACT_VALUES", "ValueFidelityTests", "nested", "same_value"]


def nested(depth: int) -> Any:
    """A value whose lists nest ``depth`` deep (``nested(1) == [0]``)."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


EXACT_VALUES: dict[str, Any] = {
    "int 2^63": 2**63,
    "int 2^64 + 1": 2**64 + 1,
    "int -2^63 - 1": -(2**63) - 1,
    "int 2^53 + 1": 2**53 + 1,
    "int 10^40": 10**40,
    "float 1e16": 1e16,
    "float 1e308": 1e308,
    "float 0.1": 0.1,
    "float -0.0": -0.0,
    "float 1.0": 1.0,
    "float 5e-324": 5e-324,
    "float max": 1.7976931348623157e308,
    "float 123456789.123456789": 123456789.123456789,
    "empty string": "",
    "astral": "🚀 𝄞 \U0001f600 \U0010fffd",
    "controls and NUL": "a\x00b\x01\x1f\x7f\x85c",
    "escapes": '\\ " / \b \f \n \r \t \u2028 \u2029 \ufeff',
    "empty containers": {"": [], "{}": {}},
    "mixed": [True, False, None, 0, -1, 1.5, "s", {"k": [None, {}]}],
    "dict keys": {"": 0, "🚀": 1, "a.b": 2, "$x": 3, "k\x00": 4},
    "nested to the limit": nested(MAX_DEPTH),
}
"""Values every context store must keep exactly, by key."""

EXACT_KEYS: dict[str, Any] = {
    "": "under the empty key",
    "🚀 astral key 𝄞": "astral",
    " ": "a space",
}
"""Odd keys every context store must keep (more in the kit's ``HOSTILE_KEYS``)."""


def same_value(a: Any, b: Any) -> bool:
    """Equal as JSON values *and* types: ``1 != 1.0``, ``0.0 != -0.0``, NaN equals NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_value(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# Bad values, each written by a node of its own run: (key written, value, words of which
# one must be in the error). ``None`` as key: the node returns the value as its output.
_SURROGATE = "x\udc00y"
_BAD_CASES: dict[str, tuple[str | None, Any, tuple[str, ...]]] = {
    "surrogate value": ("bad value", {"ok": "fine", "bad": _SURROGATE}, ("surrogate",)),
    "surrogate key": (_SURROGATE, 1, ("surrogate",)),
    "surrogate dict key": ("bad dict", {"ok": {"k\udc00": 1}}, ("surrogate",)),
    "too deep": ("deep", nested(MAX_DEPTH + 1), ("deep", "nest", "depth")),
    "nan": ("nan", [1.0, math.nan], ("nan",)),
    "infinity": ("inf", {"x": math.inf}, ("nan", "infinity")),
    "surrogate output": (None, _SURROGATE, ("surrogate",)),
}

_GOOD_RUNS = 10
_GATE_SECONDS = 2.0


class _Gate:
    """Holds every node that arrives until ``expected`` arrived (or a short timeout),
    so their commits leave one worker together: in one pipeline, batch or script if
    the adapter batches at all."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.open = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.expected:
            self.open.set()
        try:
            async with asyncio.timeout(_GATE_SECONDS):
                await self.open.wait()
        except TimeoutError:
            self.open.set()


def _key_named(key: str | None, message: str) -> bool:
    if key is None:
        return "_outputs." in message
    return repr(key)[1:-1] in message or ascii(key)[1:-1] in message or key in message


@pytest.mark.asyncio
class ValueFidelityTests:
    """Value round trips and bad values (see the module docstring)."""

    if TYPE_CHECKING:
        supports_dead_letter: ClassVar[bool]
        supports_queue_retry: ClassVar[bool]
        queue_retry_options: ClassVar[Mapping[str, Any]]
        timeout_seconds: ClassVar[float]

        def fleet(
            self, factory: AdapterFactory, *flows: Flow, workers: int | None = None, **options: Any
        ) -> contextlib.AbstractAsyncContextManager[Fleet]: ...

        async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None: ...

        async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]: ...

    async def test_values_round_trip_exactly(self, adapter_factory: AdapterFactory) -> None:
        """Big ints, floats, astral text, NUL, empty keys and strings, and values nested
        to ``MAX_DEPTH`` come back exactly: through the initial context, a node's
        deltas and output, the next node's reads and input, and the final result."""
        written = {**EXACT_VALUES, **EXACT_KEYS}

        async def write(ctx: NodeContext) -> Any:
            for key, value in written.items():
                await ctx.set(key, value)
            return EXACT_VALUES["nested to the limit"]

        async def read(ctx: NodeContext) -> int:
            assert same_value(ctx.input, EXACT_VALUES["nested to the limit"]), "input changed"
            for key in written:
                await ctx.set(f"copy/{key}", await ctx.get(key))
            for key in EXACT_VALUES:
                await ctx.set(f"init copy/{key}", await ctx.get(f"init/{key}"))
            return len(written)

        async def floats(ctx: NodeContext) -> Any:
            return [1e16, 1e308, 0.1, -0.0, 2**64 + 1]

        flow = (
            Flow("fidelity")
            .node("w", write)
            .node("r", read)
            .node("f", floats)
            .node("g", lambda c: c.input)
            .chain("w", "r", "f", "g")
        )
        initial = {f"init/{k}": v for k, v in EXACT_VALUES.items()}
        async with self.fleet(adapter_factory, flow) as fleet:
            result = await fleet.run("fidelity", initial)
            assert result.status == "completed", result.errors
            ctx = result.context
            changed = [
                key
                for key, value in written.items()
                if not (
                    same_value(ctx.get(key), value) and same_value(ctx.get(f"copy/{key}"), value)
                )
            ]
            changed += [
                f"init/{key}"
                for key, value in EXACT_VALUES.items()
                if not (
                    same_value(ctx.get(f"init/{key}"), value)
                    and same_value(ctx.get(f"init copy/{key}"), value)
                )
            ]
            assert changed == [], f"values changed in the store: {changed}"
            assert same_value(ctx["_outputs.w"], EXACT_VALUES["nested to the limit"])
            expected = [1e16, 1e308, 0.1, -0.0, 2**64 + 1]
            assert same_value(ctx["_outputs.f"], expected), ctx["_outputs.f"]
            assert same_value(ctx["_outputs.g"], expected), ctx["_outputs.g"]

    async def test_unstorable_value_fails_only_its_run(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Lone surrogates (in values, keys, dict keys, outputs), nesting past
        ``MAX_DEPTH`` and NaN/Infinity, each in its own run committed together with
        ordinary runs: each bad run fails once, naming the key and the reason (or keeps
        the value exactly); the ordinary runs complete untouched; no worker dies."""
        gate = _Gate(len(_BAD_CASES) + _GOOD_RUNS)

        async def work(ctx: NodeContext) -> Any:
            case = await ctx.get("case")
            await gate.wait()
            if case in _BAD_CASES:
                key, value, _ = _BAD_CASES[case]
                if key is None:
                    return value
                await ctx.set(key, value)
                return "wrote it"
            await ctx.set("value", {"n": case, "text": "🚀 ok", "f": 1e16})
            return case

        flow = (
            Flow("values")
            .node("w", work)
            .node("after", lambda c: ["after", c.input])
            .chain("w", "after")
        )
        async with self.fleet(adapter_factory, flow) as fleet:
            client = fleet.client
            bad = {case: await client.start_run("values", {"case": case}) for case in _BAD_CASES}
            good = {i: await client.start_run("values", {"case": i}) for i in range(_GOOD_RUNS)}
            for i, run_id in good.items():
                result = await client.wait_for_result(run_id, self.timeout_seconds)
                assert result.status == "completed", (i, result.errors)
                assert same_value(result.context["value"], {"n": i, "text": "🚀 ok", "f": 1e16})
                assert result.context["_outputs.after"] == ["after", i]
            problems: list[str] = []
            for case, run_id in bad.items():
                result = await client.wait_for_result(run_id, self.timeout_seconds)
                problems += _check_bad_run(fleet, case, result)
            assert problems == [], "\n".join(problems)
            for run_id in bad.values():
                assert await fleet.status(run_id) in {"failed", "completed"}

    async def test_raw_garbage_is_dead_lettered_beside_good_runs(
        self, adapter_factory: AdapterFactory
    ) -> None:
        """Bodies no worker can take (deeply nested JSON, a lone surrogate spelled as a
        JSON escape, wrong types, a large string, a bare JSON string) put on the queue
        while runs go on: each is dead-lettered with the reason, the runs complete and
        every worker keeps running."""
        flow = Flow("garbage-neighbour").node("a", lambda c: "ok").node("b", lambda c: c.input)
        flow.chain("a", "b")
        garbage = [
            b"[" * 5000 + b"]" * 5000,
            b'{"runId": "\\udc00", "blueprintId": "garbage-neighbour", "nodeId": "a"}',
            b'{"runId": "r", "blueprintId": 7, "nodeId": "a"}',
            b'{"runId": "r", "blueprintId": "garbage-neighbour", "nodeId": "a", "x": 1}',
            b'"' + b"x" * 70_000 + b'"',
            b'"just a string"',
        ]
        async with self.fleet(adapter_factory, flow) as fleet:
            runs = [await fleet.client.start_run("garbage-neighbour") for _ in range(3)]
            for raw in garbage:
                await self.enqueue_raw(fleet.client, raw)
            runs += [await fleet.client.start_run("garbage-neighbour") for _ in range(3)]
            for run_id in runs:
                result = await fleet.client.wait_for_result(run_id, self.timeout_seconds)
                assert result.status == "completed", result.errors
                assert result.context["_outputs.b"] == "ok"
            if self.supports_dead_letter:
                await fleet.until(
                    lambda: _at_least(self.dead_letters(fleet.client), len(garbage)),
                    f"{len(garbage)} dead-lettered bodies",
                )
                reasons = await self.dead_letters(fleet.client)
                assert len(reasons) == len(garbage), reasons
                assert all("payload" in r.lower() for r in reasons), reasons
            assert fleet.dead_workers() == []

    async def test_hand_back_is_not_an_attempt(self, adapter_factory: AdapterFactory) -> None:
        """In queue retry mode, deliveries handed back by a worker lacking the run's
        blueprint version use up none of the node's attempts: its first execution is
        attempt 1, and a node allowed two attempts that fails once still completes."""
        if not self.supports_queue_retry:
            pytest.skip(f"{type(self).__name__}: the queue has no native retries")
        attempts: list[int] = []

        def versioned(version: str) -> Flow:
            def flaky(ctx: NodeContext) -> str:
                attempts.append(ctx.attempt)
                if ctx.attempt < 2:
                    raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
                return f"v{version} on attempt {ctx.attempt}"

            flow = Flow("handback", version=version).node("f", flaky, max_retries=2)
            return flow.node("g", lambda c: c.input).chain("f", "g")

        fleet_ctx = _fleet_with(
            self, adapter_factory, versioned("1"), versioned("2"), **self.queue_retry_options
        )
        async with fleet_ctx as fleet:
            run = await fleet.client.start_run("handback")
            await fleet.until(
                lambda: (
                    sum(
                        "version" in e.data.get("reason", "")
                        for e in fleet.events_of("job:requeued", run)
                    )
                    >= 3
                ),
                "the v2 worker to hand the job back three times",
            )
            assert attempts == []
            await fleet.start(1, **self.queue_retry_options)  # a v1 worker
            result = await fleet.client.wait_for_result(run, self.timeout_seconds)
            assert result.status == "completed", result.errors
            assert attempts == [1, 2], attempts
            assert result.context["_outputs.g"] == "v1 on attempt 2"


def _fleet_with(
    kit: ValueFidelityTests,
    factory: AdapterFactory,
    client_flow: Flow,
    worker_flow: Flow,
    **options: Any,
) -> contextlib.AbstractAsyncContextManager[Fleet]:
    """A fleet whose client (and later workers) know ``client_flow`` and whose first
    worker knows only ``worker_flow``."""
    from flowcraft.testing.adapter import Fleet  # the kit's module imports this one

    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[Fleet]:
        fleet = Fleet(factory, RuntimeOptions.from_flows(client_flow), timeout=kit.timeout_seconds)
        try:
            await fleet.start(1, RuntimeOptions.from_flows(worker_flow), **options)
            yield fleet
            assert fleet.dead_workers() == [], "a worker died"
        finally:
            await fleet.stop()

    return run()


def _check_bad_run(fleet: Fleet, case: str, result: FinalResult) -> list[str]:
    """What is wrong with how the run of bad case ``case`` ended (nothing: [])."""
    key, value, words = _BAD_CASES[case]
    where = f"{case}: "
    if result.status == "completed":
        stored = result.context.get("_outputs.w" if key is None else key)
        if same_value(stored, value):
            return []  # the store kept it exactly: as good as refusing it
        return [where + f"completed, but the value changed: {stored!r}"]
    if result.status != "failed":
        return [where + f"ended {result.status!r}"]
    if len(result.errors) != 1:
        return [where + f"{len(result.errors)} errors: {result.errors}"]
    error = result.errors[0]
    message = str(error.get("message", ""))
    found = []
    if error.get("nodeId") != "w":
        found.append(where + f"the error names node {error.get('nodeId')!r}, not 'w'")
    if not _key_named(key, message):
        found.append(where + f"the error does not name the key {key!r}: {message}")
    if not any(word in message.lower() for word in words):
        found.append(where + f"the error does not say why ({' or '.join(words)}): {message}")
    if "_outputs.after" in result.context:
        found.append(where + "the node after the failed one ran")
    published = [p.to_json_dict() for p in fleet.published(result.run_id)]
    if not published or any(p != published[0] for p in published):
        found.append(where + f"published {len(published)} different results")
    return found


async def _at_least(messages: Awaitable[list[str]], n: int) -> bool:
    return len(await messages) >= n
