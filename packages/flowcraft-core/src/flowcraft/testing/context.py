"""Conformance tests every run context store (an :class:`~flowcraft.context.AsyncContext`
behind a distributed adapter) must pass, the guarded ``patch`` included.

Subclass :class:`ContextStoreTests` in a ``Test*`` class and give it a ``context``
fixture yielding the context of a fresh run nobody has written to (namespaced, so
tests sharing a server do not see each other's runs)::

    class TestMyContext(ContextStoreTests):
        @pytest.fixture
        async def context(self, my_table) -> AsyncIterator[AsyncContext]:
            yield MyContext(my_table, run_id=uuid.uuid4().hex)

Override :meth:`ContextStoreTests.same_run` to return a second handle on the same
run (another client or connection), so that the racing tests race through separate
connections. A test that the backend cannot pass may be overridden only if marked
``@pytest.mark.xfail(reason=...)``; ``test_no_overrides_DO_NOT_OVERRIDE`` fails
otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from flowcraft.context import AsyncContext, PatchOperation
from flowcraft.testing.store import _GUARD, _KIT_MODULE_PREFIX, _override_problems

__all__ = ["ContextStoreTests"]

# Keys that break naive stores: quoting, templating, paths, escapes, size.
_HOSTILE_KEYS = [
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
    "_flowcraft.n.node with spaces",
    "k" * 1024,
]

_VALUES: list[Any] = [
    0,
    -7,
    2**53 + 1,
    1.5,
    "",
    "text é 🚀",
    True,
    False,
    [],
    [1, "two", {"three": 3}],
    {},
    {"nested": {"list": [1, 2, {"deep": True}]}},
]


def _set(key: str, value: Any) -> PatchOperation:
    return PatchOperation("set", key, value)


@pytest.mark.asyncio
class ContextStoreTests:
    """The run context contract (CONTRACTS.md section 1), as tests."""

    racers: ClassVar[int] = 20
    """How many guarded patches race for one guard in the concurrency test."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _GUARD in vars(cls) and not cls.__module__.startswith(_KIT_MODULE_PREFIX):
            raise TypeError(f"{cls.__qualname__} must not override {_GUARD}")

    @pytest.fixture
    def context(self) -> Iterator[AsyncContext]:
        """Override: yield the context of a FRESH run (nothing written yet)."""
        raise NotImplementedError(f"{type(self).__name__} must define a `context` fixture")

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        """Override: another handle on ``context``'s run (another client or connection)."""
        return context

    async def test_no_overrides_DO_NOT_OVERRIDE(self) -> None:
        """Kit tests may only be overridden to mark them xfail with a reason."""
        problems = _override_problems(type(self))
        if problems:
            pytest.fail(f"{type(self).__name__} weakens the kit: " + "; ".join(problems))

    # ---------------------------------------------------------------- reads and writes

    async def test_fresh_run_is_empty(self, context: AsyncContext) -> None:
        """A run nobody wrote reads as empty everywhere."""
        assert await context.get("missing") is None
        assert await context.get_many(["a", "b"]) == {}
        assert await context.to_dict() == {}

    async def test_patch_round_trips_values_exactly(self, context: AsyncContext) -> None:
        """Every JSON value comes back equal and of the same type."""
        values = {f"v{i}": value for i, value in enumerate(_VALUES)}
        assert await context.patch([_set(k, v) for k, v in values.items()]) is True
        found = await context.get_many(list(values))
        assert found == values
        for key, value in values.items():
            assert type(found[key]) is type(value), key
            got = await context.get(key)
            assert got == value, key
            assert type(got) is type(value), key
        assert await context.to_dict() == values

    async def test_get_many_returns_only_present_keys(self, context: AsyncContext) -> None:
        await context.patch([_set("a", 1), _set("b", {"x": 2})])
        assert await context.get_many(["a", "missing", "b"]) == {"a": 1, "b": {"x": 2}}
        assert await context.get_many([]) == {}

    async def test_patch_applies_in_order(self, context: AsyncContext) -> None:
        """Deletes and sets apply as listed: the last operation on a key wins."""
        await context.patch([_set("gone", 1), _set("kept", 1), _set("reset", 1)])
        assert await context.patch(
            [
                PatchOperation("delete", "gone"),
                _set("kept", 2),
                PatchOperation("delete", "reset"),
                _set("reset", 3),
                _set("new", 4),
                PatchOperation("delete", "new"),
            ]
        )
        assert await context.to_dict() == {"kept": 2, "reset": 3}

    async def test_hostile_keys_round_trip(self, context: AsyncContext) -> None:
        """Keys with quotes, braces, dots, escapes, unicode, ``$`` and 1 KB survive exactly."""
        values = {key: {"for": key} for key in _HOSTILE_KEYS}
        await context.patch([_set(k, v) for k, v in values.items()])
        assert await context.get_many(list(values)) == values
        assert await context.to_dict() == values
        await context.patch([PatchOperation("delete", k) for k in _HOSTILE_KEYS[::2]])
        assert set(await context.to_dict()) == set(_HOSTILE_KEYS[1::2])

    # ---------------------------------------------------------------- the guarded patch

    async def test_unguarded_patch_returns_true(self, context: AsyncContext) -> None:
        assert await context.patch([_set("a", 1)]) is True
        assert await context.patch([_set("a", 2)], guard=None) is True
        assert await context.patch([_set("a", 3)], guard={}) is True
        assert await context.get("a") == 3

    async def test_guard_absent(self, context: AsyncContext) -> None:
        """``None`` holds while the key is absent, and not once it exists."""
        assert await context.patch([_set("claim", "first"), _set("x", 1)], guard={"claim": None})
        assert not await context.patch(
            [_set("claim", "second"), _set("y", 1)], guard={"claim": None}
        )
        assert await context.to_dict() == {"claim": "first", "x": 1}
        await context.patch([PatchOperation("delete", "claim")])
        assert await context.patch([_set("claim", "third")], guard={"claim": None})
        assert await context.get("claim") == "third"

    async def test_guard_equal(self, context: AsyncContext) -> None:
        """An int guard matches an equal JSON integer, a str guard an equal JSON string."""
        await context.patch([_set("n", 3), _set("holder", "worker-1/abc")])
        assert await context.patch([_set("a", 1)], guard={"n": 3})
        assert await context.patch([_set("b", 1)], guard={"holder": "worker-1/abc"})
        assert await context.patch([_set("c", 1)], guard={"n": 3, "holder": "worker-1/abc"})
        assert await context.get_many(["a", "b", "c"]) == {"a": 1, "b": 1, "c": 1}

    async def test_guard_not_equal_writes_nothing(self, context: AsyncContext) -> None:
        """A failing guard refuses the whole patch: no set, no delete."""
        await context.patch([_set("n", 3), _set("keep", "me"), _set("s", "abc")])
        refused: list[dict[str, int | str | None]] = [
            {"n": 2},
            {"n": 4},
            {"n": None},
            {"s": "abd"},
            {"s": "ABC"},
            {"s": ""},
            {"missing": 0},
            {"missing": ""},
        ]
        for guard in refused:
            assert not await context.patch(
                [_set("n", 99), PatchOperation("delete", "keep"), _set("new", 1)], guard=guard
            ), guard
        assert await context.to_dict() == {"n": 3, "keep": "me", "s": "abc"}

    async def test_guard_other_types_never_match(self, context: AsyncContext) -> None:
        """A stored value of another JSON type never matches: ``3`` is not ``"3"``, a
        bool is not an int, a float, list or object matches no guard."""
        await context.patch(
            [
                _set("int", 3),
                _set("text", "3"),
                _set("bool", True),
                _set("float", 3.5),
                _set("list", [3]),
                _set("obj", {"v": 3}),
                _set("null", None),
            ]
        )
        guards: list[dict[str, int | str | None]] = [
            {"int": "3"},
            {"text": 3},
            {"bool": 1},
            {"bool": "true"},
            {"float": 3},
            {"list": 3},
            {"obj": 3},
            {"obj": '{"v": 3}'},
            {"null": 0},
            {"null": ""},
        ]
        for guard in guards:
            assert not await context.patch([_set("touched", True)], guard=guard), guard
        assert await context.get("touched") is None

    async def test_guard_values_are_checked(self, context: AsyncContext) -> None:
        """Guard values are None, int or str only: anything else is a TypeError."""
        for bad in (True, 1.5, [1], {"a": 1}):
            with pytest.raises(TypeError):
                await context.patch([_set("a", 1)], guard={"k": bad})  # type: ignore[dict-item]
        assert await context.get("a") is None

    async def test_guard_of_several_keys(self, context: AsyncContext) -> None:
        """Every key must hold; one failing key refuses the patch."""
        await context.patch([_set("n.x", 1), _set("status", "running")])
        guard: dict[str, int | str | None] = {"n.x": 1, "status": "running", "end": None}
        assert await context.patch([_set("out", "first")], guard=guard)
        for key, wrong in (("n.x", 2), ("status", "done"), ("end", "x")):
            assert not await context.patch([_set("out", "second")], guard={**guard, key: wrong}), (
                key
            )
        await context.patch([_set("end", "completed")])
        assert not await context.patch([_set("out", "third")], guard=guard)
        assert await context.get("out") == "first"

    async def test_guard_key_written_by_the_same_patch(self, context: AsyncContext) -> None:
        """The typical commit: guard ``n == 2`` and set ``n = 3``; a stale repeat of it
        (guard ``n == 2`` again) is refused, the next one (``n == 3``) applies."""
        assert await context.patch([_set("n", 1)], guard={"n": None})
        assert await context.patch([_set("n", 2), _set("out", "one")], guard={"n": 1})
        assert not await context.patch([_set("n", 2), _set("out", "stale")], guard={"n": 1})
        assert await context.patch([_set("n", 3), _set("out", "two")], guard={"n": 2})
        assert await context.patch([PatchOperation("delete", "n")], guard={"n": 3})
        assert await context.patch([_set("n", 1)], guard={"n": None})
        assert await context.get_many(["n", "out"]) == {"n": 1, "out": "two"}

    async def test_guard_on_a_fresh_run(self, context: AsyncContext) -> None:
        """On a run nobody wrote, ``None`` holds and any value fails (creating nothing)."""
        assert not await context.patch([_set("a", 1)], guard={"k": 1})
        assert not await context.patch([_set("a", 1)], guard={"k": "x"})
        assert await context.to_dict() == {}
        assert await context.patch([_set("a", 1)], guard={"k": None})
        assert await context.to_dict() == {"a": 1}

    async def test_guard_with_hostile_keys(self, context: AsyncContext) -> None:
        """Guard keys travel like context keys: any key, however hostile, works."""
        key = _HOSTILE_KEYS[1]
        assert await context.patch([_set(key, 7)], guard={key: None, _HOSTILE_KEYS[-1]: None})
        assert not await context.patch([_set(key, 8)], guard={key: None})
        assert await context.patch([_set(key, 8)], guard={key: 7})
        assert await context.get(key) == 8

    async def test_concurrent_racers_exactly_one_applies(self, context: AsyncContext) -> None:
        """N patches racing on one guard (each through its own handle where the store
        has them): exactly one applies, and the state is exactly the winner's."""
        await context.patch([_set("n", 4), _set("base", True)])
        handles = [await self.same_run(context) for _ in range(self.racers)]

        async def race(i: int, ctx: AsyncContext) -> bool:
            return await ctx.patch(
                [_set("n", 5), _set("winner", i), _set(f"by {i}", True)], guard={"n": 4}
            )

        won = await asyncio.gather(*(race(i, ctx) for i, ctx in enumerate(handles)))
        winners = [i for i, ok in enumerate(won) if ok]
        assert len(winners) == 1, winners
        assert await context.to_dict() == {
            "n": 5,
            "base": True,
            "winner": winners[0],
            f"by {winners[0]}": True,
        }

    async def test_concurrent_creators_exactly_one_applies(self, context: AsyncContext) -> None:
        """N racing create-if-absent patches on a fresh run (``start_run``'s): one wins."""
        handles = [await self.same_run(context) for _ in range(self.racers)]
        won = await asyncio.gather(
            *(
                ctx.patch([_set("meta", f"request {i}"), _set(f"by {i}", i)], guard={"meta": None})
                for i, ctx in enumerate(handles)
            )
        )
        winners = [i for i, ok in enumerate(won) if ok]
        assert len(winners) == 1, winners
        assert await context.to_dict() == {
            "meta": f"request {winners[0]}",
            f"by {winners[0]}": winners[0],
        }
