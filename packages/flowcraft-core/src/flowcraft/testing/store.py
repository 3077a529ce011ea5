"""Conformance tests every :class:`~flowcraft.distributed.CoordinationStore` must pass.

Subclass :class:`CoordinationStoreTests` in a ``Test*`` class and give it a
``store`` fixture yielding a fresh, empty store (namespaced, so tests sharing a
server do not see each other's keys)::

    class TestMyStore(CoordinationStoreTests):
        short_ttl_seconds = 0.5
        ttl_resolution_seconds = 0.2

        @pytest.fixture
        async def store(self) -> AsyncIterator[CoordinationStore]:
            async with MyStore(prefix=f"test:{uuid.uuid4().hex}:") as store:
                yield store

Give an ``other_store`` fixture too (same backend, another namespace) to check
isolation. A test that the backend cannot pass may be overridden only if marked
``@pytest.mark.xfail(reason=...)``; ``test_no_overrides_DO_NOT_OVERRIDE`` fails
otherwise, so the kit stays the single definition of the contract.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from flowcraft.distributed.coordination import CoordinationStore

__all__ = ["CoordinationStoreTests", "ManualClock"]

_GUARD = "test_no_overrides_DO_NOT_OVERRIDE"
_KIT_MODULE_PREFIX = "flowcraft.testing."

# Values and keys that break naive stores: quoting, templating, Lua/JSON, hash tags.
_AWKWARD_STRINGS = [
    "",
    "plain",
    "quotes ' \" `",
    "braces {a} {{b}} ${c} %(d)s",
    'json {"k": [1, 2]}',
    "dots.and:colons/slashes\\back",
    "glob * ? [x]",
    "unicode é 中文 🚀 \u200b",
    "new\nline\ttab\r",
    "nul \x00 byte",
    "-1",
    "x" * 1024,
]


class ManualClock:
    """A monotonic clock that moves only when told; pass it as a store's ``clock``."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward (never backward: the clock is monotonic)."""
        if seconds < 0:
            raise ValueError("a monotonic clock cannot go back")
        self.now += seconds


def _has_xfail_reason(func: Callable[..., Any]) -> bool:
    marks = getattr(func, "pytestmark", [])
    return any(m.name == "xfail" and m.kwargs.get("reason") for m in marks)


def _override_problems(cls: type) -> list[str]:
    """Kit tests that ``cls`` removed, or overrode without ``xfail(reason=...)``."""
    problems: list[str] = []
    kits = [k for k in cls.__mro__ if k.__module__.startswith(_KIT_MODULE_PREFIX)]
    for kit in kits:
        for name, original in vars(kit).items():
            if not name.startswith("test") or not callable(original):
                continue
            actual = inspect.getattr_static(cls, name, None)
            if actual is original:
                continue
            if not callable(actual):
                problems.append(f"{name}: removed")
            elif not _has_xfail_reason(actual):
                problems.append(f"{name}: overridden without @pytest.mark.xfail(reason=...)")
    return problems


@pytest.mark.asyncio
class CoordinationStoreTests:
    """The :class:`CoordinationStore` contract, as tests (see the module docstring)."""

    short_ttl_seconds: ClassVar[float] = 1.0
    """The TTL the expiry tests use; small enough to wait for."""

    ttl_resolution_seconds: ClassVar[float] = 1.0
    """Margin past a TTL after which the key must read as absent."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _GUARD in vars(cls) and not cls.__module__.startswith(_KIT_MODULE_PREFIX):
            raise TypeError(f"{cls.__qualname__} must not override {_GUARD}")

    @pytest.fixture
    def store(self) -> Iterator[CoordinationStore]:
        """Override: yield a fresh, EMPTY, namespaced store; clean it up after."""
        raise NotImplementedError(f"{type(self).__name__} must define a `store` fixture")

    @pytest.fixture
    def other_store(self) -> Iterator[CoordinationStore]:
        """Override: a second fresh store on the same backend in another namespace."""
        pytest.skip(f"{type(self).__name__} has no `other_store` fixture: isolation not checked")

    async def advance_time(self, seconds: float) -> None:
        """Let ``seconds`` pass; override to move a fake clock instead of sleeping."""
        await asyncio.sleep(seconds)

    async def _past_ttl(self, ttl: float) -> None:
        await self.advance_time(ttl + self.ttl_resolution_seconds)

    async def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:
        """Kit tests may only be overridden to mark them xfail with a reason."""
        problems = _override_problems(type(self))
        if problems:
            pytest.fail(f"{type(self).__name__} weakens the kit: " + "; ".join(problems))

    async def test_get_missing_key_is_none(self, store: CoordinationStore) -> None:
        """An absent key reads as None, not an empty string."""
        assert await store.get("missing") is None

    async def test_increment_counts_from_one(self, store: CoordinationStore) -> None:
        """A new counter starts at 0; each call returns the new value."""
        ttl = self.short_ttl_seconds * 100
        assert [await store.increment("c", ttl) for _ in range(3)] == [1, 2, 3]
        assert await store.get("c") == "3"

    async def test_increment_keys_are_independent(self, store: CoordinationStore) -> None:
        """Join counters of different nodes must not share a count."""
        ttl = self.short_ttl_seconds * 100
        await store.increment("a", ttl)
        await store.increment("a", ttl)
        assert await store.increment("b", ttl) == 1
        assert await store.get("a") == "2"

    async def test_increment_concurrent_is_atomic(self, store: CoordinationStore) -> None:
        """200 racing increments: no lost update, each caller sees a distinct value."""
        ttl = self.short_ttl_seconds * 100
        results = await asyncio.gather(*(store.increment("join", ttl) for _ in range(200)))
        assert sorted(results) == list(range(1, 201))
        assert await store.get("join") == "200"

    async def test_set_if_not_exist_first_wins(self, store: CoordinationStore) -> None:
        """The first writer wins; later writers fail and do not overwrite."""
        ttl = self.short_ttl_seconds * 100
        assert await store.set_if_not_exist("lock", "first", ttl) is True
        assert await store.set_if_not_exist("lock", "second", ttl) is False
        assert await store.get("lock") == "first"
        await store.increment("counter", ttl)
        assert await store.set_if_not_exist("counter", "x", ttl) is False
        assert await store.get("counter") == "1"

    async def test_set_if_not_exist_concurrent_single_winner(
        self, store: CoordinationStore
    ) -> None:
        """50 racing claims: exactly one wins and its value is the one stored."""
        ttl = self.short_ttl_seconds * 100
        values = [f"worker-{i}" for i in range(50)]
        won = await asyncio.gather(*(store.set_if_not_exist("claim", v, ttl) for v in values))
        winners = [v for v, ok in zip(values, won, strict=True) if ok]
        assert len(winners) == 1
        assert await store.get("claim") == winners[0]

    async def test_delete_removes_key(self, store: CoordinationStore) -> None:
        """After delete the key is absent: a claim wins again, a counter restarts."""
        ttl = self.short_ttl_seconds * 100
        await store.set_if_not_exist("k", "v", ttl)
        await store.delete("k")
        assert await store.get("k") is None
        assert await store.set_if_not_exist("k", "w", ttl) is True
        assert await store.get("k") == "w"
        await store.increment("n", ttl)
        await store.delete("n")
        assert await store.increment("n", ttl) == 1

    async def test_delete_missing_key_is_fine(self, store: CoordinationStore) -> None:
        """Deleting twice (a redelivered cleanup) is not an error."""
        await store.delete("never-set")
        await store.delete("never-set")
        assert await store.get("never-set") is None

    @pytest.mark.parametrize("value", _AWKWARD_STRINGS)
    async def test_values_round_trip(self, store: CoordinationStore, value: str) -> None:
        """Values come back exactly, whatever they contain."""
        assert await store.set_if_not_exist("v", value, self.short_ttl_seconds * 100)
        assert await store.get("v") == value

    @pytest.mark.parametrize("key", [k for k in _AWKWARD_STRINGS if k])
    async def test_awkward_keys_work(self, store: CoordinationStore, key: str) -> None:
        """Hostile keys (quotes, braces, unicode, 1 KB) work for every operation."""
        ttl = self.short_ttl_seconds * 100
        assert await store.set_if_not_exist(key, "v", ttl) is True
        assert await store.get(key) == "v"
        assert await store.extend_ttl(key, ttl) is True
        await store.delete(key)
        assert await store.get(key) is None
        assert await store.increment(key, ttl) == 1
        assert await store.get(key + "-other") is None

    @pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
    async def test_bad_ttl_is_refused(self, store: CoordinationStore, ttl: float) -> None:
        """A TTL that would mean "never expire" raises ValueError and writes nothing."""
        with pytest.raises(ValueError, match="ttl"):
            await store.increment("t", ttl)
        with pytest.raises(ValueError, match="ttl"):
            await store.set_if_not_exist("t", "v", ttl)
        with pytest.raises(ValueError, match="ttl"):
            await store.extend_ttl("t", ttl)
        assert await store.get("t") is None

    async def test_key_expires_after_ttl(self, store: CoordinationStore) -> None:
        """An expired claim reads as absent and can be claimed again; a losing claim
        does not refresh the TTL."""
        ttl = self.short_ttl_seconds
        assert await store.set_if_not_exist("lease", "a", ttl) is True
        await self.advance_time(ttl / 2)
        assert await store.set_if_not_exist("lease", "b", ttl) is False
        assert await store.get("lease") == "a"
        await self.advance_time(ttl / 2 + self.ttl_resolution_seconds)
        assert await store.get("lease") is None
        assert await store.extend_ttl("lease", ttl) is False
        assert await store.set_if_not_exist("lease", "c", ttl) is True
        assert await store.get("lease") == "c"

    async def test_increment_sets_ttl_on_creation_only(self, store: CoordinationStore) -> None:
        """Like Redis INCR: later increments keep the TTL; after expiry it restarts at 1."""
        ttl = self.short_ttl_seconds
        assert await store.increment("join", ttl) == 1
        await self.advance_time(ttl / 2)
        assert await store.increment("join", ttl) == 2
        await self.advance_time(ttl / 2 + self.ttl_resolution_seconds)
        assert await store.get("join") is None
        assert await store.increment("join", ttl) == 1

    async def test_extend_ttl_keeps_key_alive(self, store: CoordinationStore) -> None:
        """A heartbeat extends the lease past its first TTL, counting from the extension."""
        ttl = self.short_ttl_seconds
        assert await store.set_if_not_exist("lease", "w1", ttl) is True
        await self.advance_time(ttl / 2)
        assert await store.extend_ttl("lease", 3 * ttl) is True
        await self._past_ttl(ttl)
        assert await store.get("lease") == "w1"
        await self._past_ttl(2 * ttl)
        assert await store.get("lease") is None

    async def test_extend_ttl_missing_key_returns_false(self, store: CoordinationStore) -> None:
        """A heartbeat for a lost lease reports False and does not create the key."""
        assert await store.extend_ttl("gone", self.short_ttl_seconds) is False
        assert await store.get("gone") is None

    async def test_namespaces_do_not_collide(
        self, store: CoordinationStore, other_store: CoordinationStore
    ) -> None:
        """Two namespaces on one backend never see each other's keys."""
        ttl = self.short_ttl_seconds * 100
        assert await store.set_if_not_exist("k", "mine", ttl) is True
        assert await other_store.set_if_not_exist("k", "theirs", ttl) is True
        assert await store.increment("n", ttl) == 1
        assert await other_store.increment("n", ttl) == 1
        await other_store.delete("k")
        assert await store.get("k") == "mine"
        assert await other_store.get("k") is None
