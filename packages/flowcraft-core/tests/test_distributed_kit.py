"""The adapter conformance kit itself: its no-override guard and its Fleet helpers."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter, InMemoryBroker
from flowcraft.testing import AdapterConformanceTests, AdapterFactory, Fleet, SideEffects


class _OverridesWithoutXfail(AdapterConformanceTests):
    async def test_linear_chain(self, adapter_factory: AdapterFactory) -> None:
        pass


class _RemovesATest(AdapterConformanceTests):
    test_fallback = None  # type: ignore[assignment]


class _XfailWithReason(AdapterConformanceTests):
    @pytest.mark.xfail(reason="the queue cannot dead-letter")
    async def test_unknown_blueprint_is_dead_lettered(
        self, adapter_factory: AdapterFactory
    ) -> None:
        pass


@pytest.mark.parametrize(
    ("cls", "problem"),
    [
        (_OverridesWithoutXfail, "test_linear_chain: overridden"),
        (_RemovesATest, "test_fallback: removed"),
    ],
)
async def test_guard_fails_a_weakened_kit(cls: type[AdapterConformanceTests], problem: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=problem):
        await cls().test_no_overrides_DO_NOT_OVERRIDE()


async def test_guard_accepts_xfail_with_reason() -> None:
    await _XfailWithReason().test_no_overrides_DO_NOT_OVERRIDE()


def test_the_guard_itself_cannot_be_overridden() -> None:
    with pytest.raises(TypeError, match="must not override"):

        class _Sneaky(AdapterConformanceTests):
            async def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:
                pass


def _factory(broker: InMemoryBroker) -> AdapterFactory:
    def build(options: RuntimeOptions, **kw: Any) -> InMemoryAdapter:
        return InMemoryAdapter(runtime_options=options, broker=broker, **kw)

    return build


def _options(flow: Flow) -> RuntimeOptions:
    return RuntimeOptions.from_flows(flow)


async def test_fleet_duplicates_drops_and_observes() -> None:
    fx = SideEffects()
    flow = Flow("f").node("a", fx.step(lambda c: 1)).node("b", fx.step(lambda c: c.input + 1))
    flow.chain("a", "b")
    broker = InMemoryBroker()
    fleet = Fleet(_factory(broker), _options(flow), timeout=10)
    try:
        await fleet.start(2)
        fleet.duplicate_enqueues = True
        result = await fleet.run("f", run_id="dup")
        assert result.status == "completed"
        assert broker.enqueued == 2 * len(fleet.enqueued) == 4
        assert fx.calls == {"dup:a:1": 1, "dup:b:1": 1}
        assert fx.keys("dup", "a") == ["dup:a:1"]
        assert fx.input_of("dup", "b") == 1
        assert [p.status for p in fleet.published("dup")] == ["completed"]
        assert fleet.meter.ops["patch"] >= 2
        assert fleet.events_of("workflow:finish", "dup")

        fleet.duplicate_enqueues = False
        fleet.drop_next_enqueue(lambda job: job.node_id == "a")
        run = await fleet.client.start_run("f", run_id="lossy")
        assert [j.node_id for j in fleet.dropped] == ["a"]
        assert await fleet.status(run) == "running"
        assert await fleet.client.reconcile(run) == 1
        assert (await fleet.client.wait_for_result(run, 10)).status == "completed"
        assert fleet.dead_workers() == []
    finally:
        await fleet.stop()


async def test_fleet_until_fails_with_what_it_waited_for() -> None:
    fleet = Fleet(_factory(InMemoryBroker()), RuntimeOptions(), timeout=0.05)
    with pytest.raises(pytest.fail.Exception, match="waiting for the moon"):
        await fleet.until(lambda: False, "the moon")


async def test_side_effects_record_attempts_of_failed_calls() -> None:
    fx = SideEffects()

    async def flaky(ctx: NodeContext) -> str:
        if ctx.attempt < 2:
            raise RuntimeError("again")
        return "ok"

    flow = Flow("fx").node("n", fx.step(flaky), max_retries=2)
    broker = InMemoryBroker()
    fleet = Fleet(_factory(broker), _options(flow), timeout=10)
    try:
        await fleet.start(1)
        result = await fleet.run("fx", run_id="r")
        assert result.status == "completed"
        assert fx.attempts == {"r:n:1": [1, 2]}
        assert fx.calls == {"r:n:1": 1}
    finally:
        await fleet.stop()
