"""RedisContext against a real Redis: hostile keys, atomic patch, TTL, the progress index."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import PatchOperation
from flowcraft.context import AsyncContext
from flowcraft.distributed import keys as K
from flowcraft.testing import ContextStoreTests
from flowcraft_bullmq import RedisContext

HOSTILE_KEYS = [
    "quotes ' \" `",
    "braces {a} {{b}} ${c} %(d)s",
    "dots.in.the.key",
    "back\\slash \\n \\\\",
    "unicode é 中文 🚀 \u200b",
    "lua ]] -- end",
    "sql '); DROP TABLE runs; --",
    "new\nline\ttab",
    "k" * 1024,
]


@pytest.fixture(params=[False, True], ids=["bytes", "decoded"])
async def ctx(request: Any, redis_url: str, prefix: str) -> Any:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(redis_url, decode_responses=request.param)
    yield RedisContext(
        client,
        f"{prefix}run:r1",
        ttl_seconds=60,
        index_key=f"{prefix}runs:active",
        index_member="r1",
    )
    await client.aclose()


async def test_hostile_keys_round_trip(ctx: RedisContext) -> None:
    ops = [PatchOperation("set", k, {"v": k, "n": i}) for i, k in enumerate(HOSTILE_KEYS)]
    await ctx.patch(ops)
    expected = {k: {"v": k, "n": i} for i, k in enumerate(HOSTILE_KEYS)}
    assert await ctx.get_many(HOSTILE_KEYS) == expected
    for i, key in enumerate(HOSTILE_KEYS):
        assert await ctx.get(key) == {"v": key, "n": i}
        assert await ctx.has(key)
    assert await ctx.to_dict() == expected


async def test_patch_sets_and_deletes_in_order(ctx: RedisContext) -> None:
    await ctx.patch([PatchOperation("set", "a", 1), PatchOperation("set", "b", 2)])
    await ctx.patch(
        [
            PatchOperation("delete", "a"),
            PatchOperation("set", "c", None),
            PatchOperation("set", "b", 3),
            PatchOperation("delete", "b"),
            PatchOperation("set", "b", 4),
        ]
    )
    assert await ctx.to_dict() == {"b": 4, "c": None}
    assert await ctx.get_many(["a", "b", "c", "missing"]) == {"b": 4, "c": None}
    assert not await ctx.has("a")
    assert await ctx.get("missing") is None


async def test_large_patch_is_one_atomic_script(ctx: RedisContext, redis_client: Any) -> None:
    ops = [PatchOperation("set", f"k{i}", i) for i in range(5000)]
    ops += [PatchOperation("delete", f"k{i}") for i in range(0, 5000, 2)]
    await ctx.patch(ops)
    state = await ctx.to_dict()
    assert len(state) == 2500
    assert state["k1"] == 1
    assert 0 < await redis_client.pttl(ctx.key) <= 60_000


async def test_progress_index_follows_the_status(ctx: RedisContext, redis_client: Any) -> None:
    index = ctx.key.rsplit("run:", 1)[0] + "runs:active"
    await ctx.patch([PatchOperation("set", K.STATUS, {"status": "running", "errors": []})])
    assert await redis_client.zscore(index, "r1") is not None
    await ctx.patch([PatchOperation("set", K.STATUS, {"status": "awaiting", "errors": []})])
    assert await redis_client.zscore(index, "r1") is None
    await ctx.patch([PatchOperation("set", "x", 1)])
    assert await redis_client.zscore(index, "r1") is not None
    await ctx.patch([PatchOperation("set", K.STATUS, {"status": "completed", "errors": []})])
    assert await redis_client.zscore(index, "r1") is None


class TestRedisContextKit(ContextStoreTests):
    """The context kit (guarded patch included); racers use clients of their own."""

    @pytest.fixture
    async def context(self, redis_url: str, prefix: str) -> Any:
        self._clients: list[Any] = []
        self._url = redis_url
        self._key = f"{prefix}run:kit"
        yield await self.same_run(None)  # type: ignore[arg-type]
        for client in self._clients:
            await client.aclose()

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        import redis.asyncio as redis_asyncio

        client = redis_asyncio.Redis.from_url(self._url)
        self._clients.append(client)
        return RedisContext(client, self._key, ttl_seconds=60)
