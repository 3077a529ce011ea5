"""DurableObjectContext against Miniflare: one call per patch, the guarded patch, hostile
keys and values that round-trip exactly, the 2 MB row limit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowcraft import StateLimitError
from flowcraft.context import AsyncContext, PatchOperation
from flowcraft.testing.adapter import HOSTILE_KEYS
from flowcraft.testing.context import ContextStoreTests
from flowcraft_cloudflare import (
    MAX_VALUE_BYTES,
    DurableObjectContext,
    WorkerClient,
    WorkerSettings,
    run_object,
)


class TestDurableObjectContext(ContextStoreTests):
    """The core's context kit; racers go through a second client (other connections)."""

    @pytest.fixture
    async def context(
        self, client: WorkerClient, settings: WorkerSettings, namespace: str
    ) -> AsyncIterator[AsyncContext]:
        run_id = f"run-{uuid.uuid4().hex[:8]}"
        self._other = WorkerClient(settings)
        yield DurableObjectContext(client, run_object(namespace, run_id), run_id)
        await self._other.aclose()

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        assert isinstance(context, DurableObjectContext)
        return DurableObjectContext(self._other, context.object_name, context.run_id)


@pytest.fixture
def ctx(client: WorkerClient, namespace: str) -> DurableObjectContext:
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    return DurableObjectContext(client, run_object(namespace, run_id), run_id, ttl_seconds=600)


def _set(key: str, value: Any) -> PatchOperation:
    return PatchOperation("set", key, value)


EXTRA_KEYS = [
    "nul \x00 inside",
    "#hash #",
    "slash/and/more/",
    "",
    "astral 𝄞 𐍈 🧪",
    "'",
    "_flowcraft.n.x",
]

VALUES: list[Any] = [
    2**64 + 1,
    -(2**100),
    1e16,
    1e308,
    0.1,
    -0.0,
    "",
    "nul \x00 and 🚀",
    None,
    [],
    {},
    {"nested": {"a": [1, 2.5, None, True]}},
    True,
]


async def test_patch_is_one_call_and_atomic(ctx: DurableObjectContext) -> None:
    before = ctx.client.requests["do"]
    assert await ctx.patch([_set("a", 1), _set("b", {"x": [1]}), PatchOperation("delete", "c")])
    assert ctx.client.requests["do"] - before == 1
    assert await ctx.get_many(["a", "b", "c"]) == {"a": 1, "b": {"x": [1]}}


async def test_last_operation_on_a_key_wins(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("k", 1), PatchOperation("delete", "k")])
    assert not await ctx.has("k")
    await ctx.patch([PatchOperation("delete", "k"), _set("k", 2)])
    assert await ctx.get("k") == 2


@pytest.mark.parametrize("key", HOSTILE_KEYS + EXTRA_KEYS)
async def test_hostile_keys_round_trip(ctx: DurableObjectContext, key: str) -> None:
    await ctx.patch([_set(key, {"k": key})])
    assert await ctx.get(key) == {"k": key}
    assert (await ctx.to_dict()) == {key: {"k": key}}
    await ctx.patch([PatchOperation("delete", key)])
    assert await ctx.to_dict() == {}


async def test_all_hostile_keys_at_once(ctx: DurableObjectContext) -> None:
    keys = HOSTILE_KEYS + EXTRA_KEYS
    await ctx.patch([_set(k, i) for i, k in enumerate(keys)])
    assert await ctx.get_many(keys) == {k: i for i, k in enumerate(keys)}


@pytest.mark.parametrize("value", VALUES, ids=repr)
async def test_values_round_trip_exactly(ctx: DurableObjectContext, value: Any) -> None:
    await ctx.patch([_set("v", value)])
    got = await ctx.get_many(["v"])
    assert "v" in got
    assert got["v"] == value
    assert type(got["v"]) is type(value)
    if isinstance(value, float):
        assert repr(got["v"]) == repr(value)


async def test_has_sees_a_stored_null(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("none", None)])
    assert await ctx.has("none")
    assert not await ctx.has("other")


async def test_value_over_the_row_limit_is_a_state_limit_error(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("kept", 1)])
    big = "x" * MAX_VALUE_BYTES
    with pytest.raises(StateLimitError) as caught:
        await ctx.patch([_set("small", 2), _set("big key", big)])
    assert ctx.run_id in str(caught.value)
    assert "big key" in str(caught.value)
    assert await ctx.to_dict() == {"kept": 1}


async def test_the_worker_refuses_an_oversized_row_itself(ctx: DurableObjectContext) -> None:
    """Python's check off: the Worker's own limit still fails the patch, writing nothing."""
    ctx.max_value_bytes = 10 * MAX_VALUE_BYTES
    with pytest.raises(StateLimitError, match="big"):
        await ctx.patch([_set("small", 2), _set("big", "é" * MAX_VALUE_BYTES)])
    assert await ctx.to_dict() == {}


async def test_a_value_just_under_the_limit_fits(ctx: DurableObjectContext) -> None:
    value = "y" * (MAX_VALUE_BYTES - 64)
    await ctx.patch([_set("k", value)])
    assert await ctx.get("k") == value


# ------------------------------------------------------------------ the guarded patch


async def test_guard_absent(ctx: DurableObjectContext) -> None:
    assert await ctx.patch([_set("a", 1)], guard={"_flowcraft.n.X": None})
    await ctx.patch([_set("_flowcraft.n.X", 1)])
    assert not await ctx.patch([_set("a", 2)], guard={"_flowcraft.n.X": None})
    assert await ctx.get("a") == 1


async def test_guard_equal_int_and_str(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("n", 2), _set("s", "holder/1")])
    assert await ctx.patch([_set("n", 3), _set("out", "x")], guard={"n": 2, "s": "holder/1"})
    assert await ctx.get_many(["n", "out"]) == {"n": 3, "out": "x"}


async def test_guard_not_equal_writes_nothing(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("n", 2)])
    assert not await ctx.patch([_set("n", 3), _set("out", "x")], guard={"n": 1})
    assert await ctx.to_dict() == {"n": 2}


@pytest.mark.parametrize(
    ("stored", "expected"),
    [(3, "3"), ("3", 3), (3.0, 3), (True, 1), ([3], 3), ({"a": 1}, "a"), (None, "None")],
    ids=repr,
)
async def test_guard_of_another_type_never_matches(
    ctx: DurableObjectContext, stored: Any, expected: int | str
) -> None:
    await ctx.patch([_set("g", stored)])
    assert not await ctx.patch([_set("out", 1)], guard={"g": expected})
    assert not await ctx.has("out")


async def test_guard_on_several_keys_needs_all(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("a", 1), _set("b", "x")])
    assert not await ctx.patch([_set("out", 1)], guard={"a": 1, "b": "y"})
    assert not await ctx.patch([_set("out", 1)], guard={"a": 1, "b": "x", "c": 0})
    assert await ctx.patch([_set("out", 1)], guard={"a": 1, "b": "x", "c": None})


async def test_guard_with_hostile_keys_and_values(ctx: DurableObjectContext) -> None:
    key = HOSTILE_KEYS[0] + "\x00🚀"
    value = 'quote " nul \x00 🚀'
    await ctx.patch([_set(key, value)])
    assert await ctx.patch([_set("out", 1)], guard={key: value})
    assert await ctx.patch([_set("big", 2**70)], guard={key: value})
    assert await ctx.patch([_set("out", 2)], guard={"big": 2**70})


async def test_guard_costs_no_extra_call(ctx: DurableObjectContext) -> None:
    before = ctx.client.requests["do"]
    await ctx.patch([_set("a", 1)], guard={"a": None})
    assert ctx.client.requests["do"] - before == 1


async def test_bad_guard_values_are_refused(ctx: DurableObjectContext) -> None:
    with pytest.raises(TypeError):
        await ctx.patch([_set("a", 1)], guard={"a": 1.5})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        await ctx.patch([_set("a", 1)], guard={"a": True})


async def test_concurrent_guarded_racers_exactly_one_wins(ctx: DurableObjectContext) -> None:
    await ctx.patch([_set("_flowcraft.n.X", 2)])

    async def racer(i: int) -> bool:
        return await ctx.patch(
            [_set("_flowcraft.n.X", 3), _set("winner", i)], guard={"_flowcraft.n.X": 2}
        )

    outcomes = await asyncio.gather(*(racer(i) for i in range(20)))
    assert sum(outcomes) == 1
    assert await ctx.get("winner") == outcomes.index(True)
    assert await ctx.get("_flowcraft.n.X") == 3
