"""The Cosmos DB context store against the Cosmos DB test server: atomic O(delta)
patches, more than 10 operations in one commit, the guarded patch, hostile keys and
values, hostile run ids, size limits, results kept first-wins."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from azure.cosmos.aio import ContainerProxy

from flowcraft.context import AsyncContext, PatchOperation
from flowcraft.errors import SerializationError, StateLimitError
from flowcraft.testing import ContextStoreTests
from flowcraft.testing.adapter import HOSTILE_KEYS
from flowcraft_azure import CosmosContext, CosmosRunStore
from flowcraft_azure._cosmos import guard_predicate, partition_value, patch_path, sql_string

from .conftest import Backends

S = PatchOperation.set
D = PatchOperation.delete

KEYS = [
    *HOSTILE_KEYS,
    "",
    "slash/and~tilde ~0 ~1 //",
    "hash # question ? percent %25",
    "id",
    "_rid",
    "_etag",
    "ttl",
    "__proto__",
    "constructor",
    "nul \x00 byte",
    "astral 𝄞 🚀 \U0010fffd",
    "/_leading",
    "_flowcraft.n.node",
]

VALUES: list[Any] = [
    2**70 + 1,
    -(2**63),
    1e16,
    1e308,
    0.1,
    5e-324,
    "",
    "astral 𝄞 🚀",
    "nul \x00",
    None,
    True,
    [],
    {},
    {"nested": {"deep": [1, 2.5, "x", None]}},
]


async def item_of(container: ContainerProxy, run_id: str) -> dict[str, Any]:
    rows = [
        r
        async for r in container.query_items(
            'SELECT * FROM c WHERE c.run = @run AND c.id = "state"',
            parameters=[{"name": "@run", "value": partition_value(run_id)}],
            partition_key=partition_value(run_id),
        )
    ]
    assert len(rows) == 1
    return rows[0]


async def test_round_trip_and_one_item_per_run(
    store: CosmosRunStore, container: ContainerProxy
) -> None:
    ctx = store.context("run-1")
    assert await ctx.get("a") is None
    assert await ctx.to_dict() == {}
    assert await ctx.patch([S("a", 1), S("b", {"x": [1, 2]})]) is True
    assert await ctx.get_many(["a", "b", "missing"]) == {"a": 1, "b": {"x": [1, 2]}}
    assert await ctx.has("a")
    assert not await ctx.has("missing")
    item = await item_of(container, "run-1")
    assert item["c"] == {"#a": "1", "#b": '{"x":[1,2]}'}, "values are JSON text under /c"
    assert await store.context("run-2").to_dict() == {}


@pytest.mark.parametrize("key", KEYS)
async def test_hostile_keys_round_trip(store: CosmosRunStore, key: str) -> None:
    ctx = store.context("hostile-keys")
    await ctx.patch([S(key, "v"), S("neighbour", 1)])
    assert await ctx.get(key) == "v"
    assert await ctx.get_many([key, "neighbour"]) == {key: "v", "neighbour": 1}
    assert await ctx.to_dict() == {key: "v", "neighbour": 1}
    await ctx.patch([D(key)])
    assert await ctx.to_dict() == {"neighbour": 1}


async def test_hostile_keys_together_in_one_commit(store: CosmosRunStore) -> None:
    ctx = store.context("all-keys")
    data = {k: i for i, k in enumerate(KEYS)}
    await ctx.patch([S(k, v) for k, v in data.items()])
    assert await ctx.to_dict() == data
    assert await ctx.get_many(list(reversed(KEYS))) == data


@pytest.mark.parametrize("value", VALUES, ids=repr)
async def test_values_round_trip_exactly(store: CosmosRunStore, value: Any) -> None:
    ctx = store.context("values")
    await ctx.patch([S("v", value)])
    got = await ctx.get_many(["v"])
    assert got == {"v": value}
    assert type(got["v"]) is type(value)
    assert (await ctx.to_dict())["v"] == value


async def test_value_none_is_present_and_delete_makes_absent(store: CosmosRunStore) -> None:
    ctx = store.context("none")
    await ctx.patch([S("k", None)])
    assert await ctx.get_many(["k"]) == {"k": None}
    await ctx.patch([D("k")])
    assert await ctx.get_many(["k"]) == {}
    assert await ctx.to_dict() == {}


async def test_deleting_absent_keys_never_fails_a_commit(store: CosmosRunStore) -> None:
    ctx = store.context("absent-delete")
    await ctx.patch([D("never-there")])  # the item does not exist yet
    await ctx.patch([S("a", 1), D("never"), D("nor-this")])
    await ctx.patch([D("never"), D("a"), D("a")])
    assert await ctx.to_dict() == {}


@pytest.mark.parametrize("n", [10, 11, 25, 60])
async def test_commits_of_any_size_apply_whole(store: CosmosRunStore, n: int) -> None:
    ctx = store.context(f"big-commit-{n}")
    await ctx.patch([S("keep", "x"), S("gone", 1)])
    ops = [S(f"k{i}", i) for i in range(n)] + [D("gone"), D("absent")]
    assert await ctx.patch(ops) is True
    expected = {"keep": "x", **{f"k{i}": i for i in range(n)}}
    assert await ctx.to_dict() == expected


async def test_large_commits_racing_small_ones_lose_nothing(store: CosmosRunStore) -> None:
    """Big commits read and replace under the etag; small ones patch: 40 writers of
    distinct keys at once, all land."""
    ctx = store.context("race")
    await ctx.patch([S("seed", 0)])

    async def writer(i: int) -> None:
        size = 12 if i % 2 else 2
        await ctx.patch([S(f"w{i}.{j}", j) for j in range(size)])

    await asyncio.gather(*(writer(i) for i in range(40)))
    state = await ctx.to_dict()
    for i in range(40):
        size = 12 if i % 2 else 2
        assert all(state[f"w{i}.{j}"] == j for j in range(size)), i


async def test_last_operation_on_a_key_wins(store: CosmosRunStore) -> None:
    ctx = store.context("order")
    await ctx.patch([S("a", 1), D("a"), S("b", 1), S("b", 2)])
    assert await ctx.to_dict() == {"b": 2}


# ---------------------------------------------------------------- the guarded patch


@pytest.mark.parametrize("size", [1, 12], ids=["patch", "replace"])
async def test_guard_absent_equal_unequal_wrong_type(store: CosmosRunStore, size: int) -> None:
    ctx = store.context(f"guard-{size}")
    ops = [S(f"x{i}", i) for i in range(size)]
    g = "_flowcraft.n.X"
    assert await ctx.patch([S(g, 1), *ops], guard={g: None}) is True
    assert await ctx.patch([S(g, 9)], guard={g: None}) is False
    assert await ctx.patch([S(g, 9), *ops], guard={g: 2}) is False
    assert await ctx.patch([S(g, 9), *ops], guard={g: "1"}) is False, "a str never matches 1"
    assert await ctx.get(g) == 1
    assert await ctx.patch([S(g, 2), *ops], guard={g: 1}) is True
    assert await ctx.get(g) == 2
    await ctx.patch([S("s", 'Ab"c\\ 🚀')])
    assert await ctx.patch([S("ok", 1), *ops], guard={"s": 'ab"c\\ 🚀'}) is False, "case"
    assert await ctx.patch([S("ok", 1), *ops], guard={"s": 'Ab"c\\ 🚀', g: 2}) is True
    assert await ctx.patch([S("no", 1), *ops], guard={"s": 'Ab"c\\ 🚀', g: 3}) is False
    assert await ctx.get("no") is None
    await ctx.patch([S("f", 3.0)])
    assert await ctx.patch([S("no", 1)], guard={"f": 3}) is False, "a float is not an int"
    await ctx.patch([D(g)])
    assert await ctx.patch([S(g, 1), *ops], guard={g: None}) is True, "deleted is absent"


async def test_guard_on_a_run_without_state(store: CosmosRunStore) -> None:
    ctx = store.context("guard-new")
    assert await ctx.patch([S("a", 1)], guard={"k": 1}) is False
    assert await ctx.to_dict() == {}
    assert await ctx.patch([S("a", 1)], guard={"k": None}) is True
    assert await ctx.to_dict() == {"a": 1}


@pytest.mark.parametrize(
    "key", ['_flowcraft.n.q"uote', "_flowcraft.n.back\\slash", "_flowcraft.n.🚀"]
)
async def test_guard_keys_are_never_query_text(store: CosmosRunStore, key: str) -> None:
    ctx = store.context("guard-hostile")
    await ctx.patch([S(key, 'v" OR 1=1 --')])
    assert await ctx.patch([S("a", 1)], guard={key: 'v" OR 1=1 --'}) is True
    assert await ctx.patch([S("b", 1)], guard={key: "v"}) is False
    assert await ctx.get("b") is None


@pytest.mark.parametrize("size", [1, 12], ids=["patch", "replace"])
async def test_guard_racers_exactly_one_wins(store: CosmosRunStore, size: int) -> None:
    ctx = store.context(f"racers-{size}")
    g = "_flowcraft.n.J"
    await ctx.patch([S(g, 0)])

    async def racer(i: int) -> bool:
        return await ctx.patch(
            [S(g, 1), S("winner", i), *(S(f"r{i}.{j}", j) for j in range(size))], guard={g: 0}
        )

    won = await asyncio.gather(*(racer(i) for i in range(20)))
    assert sum(won) == 1
    winner = won.index(True)
    state = await ctx.to_dict()
    assert state["winner"] == winner
    assert not [k for k in state if k.startswith("r") and not k.startswith(f"r{winner}.")]


# ---------------------------------------------------------------- limits and ids


async def test_a_value_past_the_limit_is_refused_naming_run_and_key(
    container: ContainerProxy,
) -> None:
    store = CosmosRunStore(container, max_state_bytes=64 * 1024)
    ctx = store.context("too-big")
    with pytest.raises(StateLimitError, match=r"too-big.*'blob'"):
        await ctx.patch([S("small", 1), S("blob", "x" * 70_000)])
    assert await ctx.to_dict() == {}
    await ctx.patch([S(f"k{i}", "y" * 5000) for i in range(11)])
    with pytest.raises(StateLimitError, match="too-big"):  # the replace path sees the total
        await ctx.patch([S(f"m{i}", "z" * 5000) for i in range(11)])


@pytest.mark.parametrize(
    "run_id",
    ["plain-1", "with/slash", "back\\slash", "q?mark", "hash#tag", "~tilde", "é🚀", "x" * 512, " "],
)
async def test_hostile_run_ids_are_separate_runs(store: CosmosRunStore, run_id: str) -> None:
    ctx = store.context(run_id)
    await ctx.patch([S("who", run_id)])
    assert await ctx.get("who") == run_id
    assert await store.context(run_id + "-other").get("who") is None
    assert await store.write_result(run_id, {"status": "completed", "id": run_id}) is True
    assert await store.read_result(run_id) == {"status": "completed", "id": run_id}


def test_partition_values_never_collide() -> None:
    plain = partition_value("abc")
    hashed = partition_value("a/b")
    assert plain == "abc"
    assert hashed.startswith("~")
    assert len(hashed) == 65
    assert partition_value(hashed) != hashed, "a hashed form is itself hashed again"


async def test_result_first_publication_wins(store: CosmosRunStore) -> None:
    assert await store.read_result("r") is None
    assert await store.write_result("r", {"status": "completed", "context": {"a": 1}}) is True
    assert await store.write_result("r", {"status": "completed", "context": {"a": 2}}) is False
    assert await store.read_result("r") == {"status": "completed", "context": {"a": 1}}


def test_paths_and_literals() -> None:
    assert patch_path("a/b~c") == "/c/#a~1b~0c"
    assert sql_string('A"\\') == '"\\u0041\\u0022\\u005C"'
    assert sql_string("🚀") == '"\\uD83D\\uDE80"'
    assert guard_predicate({"k": None, "n": "3"}) == (
        'FROM c WHERE (NOT IS_STRING(c.c["\\u0023\\u006B"]) AND c.c["\\u0023\\u006E"] = "\\u0033")'
    )
    assert json.loads(sql_string('x"y\n')) == 'x"y\n'


# ---------------------------------------------------------------- the kit


class TestCosmosContextKit(ContextStoreTests):
    """The core's context-store kit; racers go through a second client."""

    @pytest.fixture
    async def context(
        self, container: ContainerProxy, backends: Backends
    ) -> AsyncIterator[AsyncContext]:
        run_id = f"kit-{uuid.uuid4().hex}"
        async with backends.cosmos_client() as other:
            db = other.get_database_client(container.database_link.rsplit("/", 1)[-1])
            second = CosmosRunStore(db.get_container_client(container.id))
            self._handles = [CosmosRunStore(container), second]
            yield self._handles[0].context(run_id)

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        assert isinstance(context, CosmosContext)
        self._turn = getattr(self, "_turn", 0) + 1
        return self._handles[self._turn % 2].context(context.run_id)


@pytest.mark.parametrize(
    ("key", "value"),
    [("bad\udc00key", 1), ("bad value", "x\udc00"), ("bad dict", {"k\udc00": 1})],
)
async def test_unstorable_keys_and_values_name_the_key(
    store: CosmosRunStore, key: str, value: Any
) -> None:
    ctx = store.context("unstorable")
    with pytest.raises(SerializationError, match="bad"):
        await ctx.patch([S("fine", 1), S(key, value)])
    assert await ctx.to_dict() == {}
    assert await ctx.get_many(["bad\udc00key", "fine"]) == {}
