"""The in-memory coordination store: the conformance kit on a fake clock, op counts, hooks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from flowcraft.distributed import (
    CoordinationStore,
    ICoordinationStore,
    InMemoryCoordinationStore,
)
from flowcraft.distributed.coordination import validate_ttl_seconds
from flowcraft.testing import CoordinationStoreTests, ManualClock


class TestInMemoryCoordinationStore(CoordinationStoreTests):
    short_ttl_seconds = 10.0
    ttl_resolution_seconds = 0.001

    @pytest.fixture
    def clock(self) -> ManualClock:
        return ManualClock()

    @pytest.fixture
    def store(self, clock: ManualClock) -> CoordinationStore:
        self._clock = clock
        return InMemoryCoordinationStore(clock=clock)

    @pytest.fixture
    def other_store(self, clock: ManualClock) -> CoordinationStore:
        return InMemoryCoordinationStore(clock=clock)

    async def advance_time(self, seconds: float) -> None:
        self._clock.advance(seconds)


async def test_default_clock_is_monotonic_time() -> None:
    store = InMemoryCoordinationStore()
    assert store.clock is time.monotonic
    await store.set_if_not_exist("k", "v", 0.01)
    await asyncio.sleep(0.02)
    assert await store.get("k") is None


def test_satisfies_protocol() -> None:
    store = InMemoryCoordinationStore()
    assert isinstance(store, CoordinationStore)
    assert ICoordinationStore is CoordinationStore
    assert not isinstance(object(), CoordinationStore)


async def test_op_counts_one_per_call_and_reset() -> None:
    store = InMemoryCoordinationStore()
    await store.increment("a", 5)
    await store.increment("a", 5)
    await store.set_if_not_exist("b", "v", 5)
    await store.extend_ttl("b", 5)
    await store.get("b")
    await store.delete("b")
    assert store.op_counts == {
        "increment": 2,
        "set_if_not_exist": 1,
        "extend_ttl": 1,
        "get": 1,
        "delete": 1,
    }
    assert store.snapshot() == {"a": "2"}
    assert store.ttl_remaining("a") is not None
    assert sum(store.op_counts.values()) == 6, "inspection helpers are not counted"
    store.reset_counts()
    assert sum(store.op_counts.values()) == 0


class SimulatedCrash(Exception):
    pass


async def test_before_op_can_crash_before_the_store_is_touched() -> None:
    seen: list[tuple[str, str]] = []

    async def before_op(name: str, key: str) -> None:
        seen.append((name, key))
        if name == "set_if_not_exist":
            raise SimulatedCrash

    store = InMemoryCoordinationStore(before_op=before_op)
    with pytest.raises(SimulatedCrash):
        await store.set_if_not_exist("lock", "w1", 5)
    assert await store.get("lock") is None
    assert seen == [("set_if_not_exist", "lock"), ("get", "lock")]
    assert store.op_counts == {"get": 1}, "a crashed call never reached the store"


async def test_after_op_crash_leaves_the_write_applied() -> None:
    async def after_op(name: str, key: str) -> None:
        if name == "increment":
            raise SimulatedCrash

    store = InMemoryCoordinationStore(after_op=after_op)
    with pytest.raises(SimulatedCrash):
        await store.increment("join", 5)
    assert await store.get("join") == "1"


async def test_hooks_may_yield_without_breaking_atomicity() -> None:
    async def before_op(name: str, key: str) -> None:
        await asyncio.sleep(0)

    store = InMemoryCoordinationStore(before_op=before_op, after_op=before_op)
    results = await asyncio.gather(*(store.increment("n", 5) for _ in range(100)))
    assert sorted(results) == list(range(1, 101))


async def test_expiry_boundary_and_remaining_ttl() -> None:
    clock = ManualClock()
    store = InMemoryCoordinationStore(clock=clock)
    await store.set_if_not_exist("k", "v", 2)
    clock.advance(1.5)
    assert store.ttl_remaining("k") == pytest.approx(0.5)
    clock.advance(0.5)
    assert await store.get("k") is None, "a key is gone exactly at its expiry"
    assert store.ttl_remaining("k") is None


async def test_increment_refuses_a_non_integer_value() -> None:
    store = InMemoryCoordinationStore()
    await store.set_if_not_exist("k", "text", 5)
    with pytest.raises(ValueError, match="not an integer"):
        await store.increment("k", 5)
    assert await store.get("k") == "text"


async def test_expired_keys_are_swept() -> None:
    clock = ManualClock()
    store = InMemoryCoordinationStore(clock=clock)
    for i in range(10):
        await store.set_if_not_exist(f"old-{i}", "v", 1)
    clock.advance(2)
    for i in range(InMemoryCoordinationStore._SWEEP_EVERY):
        await store.increment(f"new-{i % 3}", 10)
    assert not any(k.startswith("old-") for k in store._data)


@pytest.mark.parametrize("ttl", [True, "5", None])
def test_validate_ttl_refuses_non_numbers(ttl: object) -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be a number"):
        validate_ttl_seconds(ttl)  # type: ignore[arg-type]


def test_manual_clock_is_monotonic() -> None:
    clock = ManualClock(start=5)
    clock.advance(1)
    assert clock() == 6
    with pytest.raises(ValueError, match="monotonic"):
        clock.advance(-1)


# The no-override guard, checked on kit subclasses that pytest does not collect.


class _OverridesWithoutXfail(CoordinationStoreTests):
    async def test_increment_counts_from_one(self, store: CoordinationStore) -> None:
        pass


class _RemovesATest(CoordinationStoreTests):
    test_delete_missing_key_is_fine = None  # type: ignore[assignment]


class _XfailWithoutReason(CoordinationStoreTests):
    @pytest.mark.xfail
    async def test_increment_counts_from_one(self, store: CoordinationStore) -> None:
        pass


class _XfailWithReason(CoordinationStoreTests):
    @pytest.mark.xfail(reason="backend has no atomic counter")
    async def test_increment_counts_from_one(self, store: CoordinationStore) -> None:
        pass


@pytest.mark.parametrize(
    ("cls", "problem"),
    [
        (_OverridesWithoutXfail, "test_increment_counts_from_one: overridden"),
        (_RemovesATest, "test_delete_missing_key_is_fine: removed"),
        (_XfailWithoutReason, "test_increment_counts_from_one: overridden"),
    ],
)
async def test_guard_fails_a_weakened_kit(cls: type[CoordinationStoreTests], problem: str) -> None:
    with pytest.raises(pytest.fail.Exception, match=problem):
        await cls().test_no_overrides_DO_NOT_OVERRIDE()


async def test_guard_accepts_xfail_with_reason_and_plain_subclass() -> None:
    await _XfailWithReason().test_no_overrides_DO_NOT_OVERRIDE()
    await TestInMemoryCoordinationStore().test_no_overrides_DO_NOT_OVERRIDE()


def test_guard_itself_cannot_be_overridden() -> None:
    with pytest.raises(TypeError, match="must not override"):

        class _Sneaky(CoordinationStoreTests):
            async def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:
                pass


def test_distributed_imports_without_redis() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import flowcraft.distributed as d\n"
        "try:\n"
        "    d.RedisCoordinationStore(url='redis://localhost')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert 'pip install "flowcraft-core[redis]"' in out
