"""Values and bytes no store can keep, on the real Redis (issue 22): a bad value
fails only its caller (context patch, auto-pipeline batch, run), bytes BullMQ cannot
parse are dead-lettered, and every JSON value round-trips exactly."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, PatchOperation
from flowcraft.errors import SerializationError
from flowcraft.serializer import MAX_DEPTH
from flowcraft.testing.fidelity import EXACT_VALUES, nested, same_value
from flowcraft_bullmq import BullMQAdapter, RedisContext
from flowcraft_bullmq._pipelining import AutoPipelineRedis

from .conftest import StartFleet

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def pipelined(redis_url: str) -> Any:
    client = AutoPipelineRedis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_a_bad_argument_fails_only_its_caller_in_a_batch(
    pipelined: AutoPipelineRedis, prefix: str
) -> None:
    """Fifty commands and one that cannot be encoded, issued in the same loop turn
    (one pipeline batch): only that one fails; the fifty are applied."""
    good = [pipelined.set(f"{prefix}k{i}", f"v{i}") for i in range(50)]
    bad = pipelined.set(f"{prefix}bad", "x\udc00y")
    outcomes = await asyncio.gather(*good[:25], bad, *good[25:], return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(errors) == 1, errors
    assert isinstance(errors[0], UnicodeEncodeError), errors
    assert outcomes.count(True) == 50
    values = await pipelined.mget([f"{prefix}k{i}" for i in range(50)])
    assert values == [f"v{i}".encode() for i in range(50)]
    assert await pipelined.exists(f"{prefix}bad") == 0


async def test_bad_patch_fails_alone_beside_concurrent_patches(
    pipelined: AutoPipelineRedis, prefix: str
) -> None:
    """Context patches of many runs at once, one with a lone surrogate and one nested
    5,000 deep: those two raise SerializationError naming the key, before sending;
    every other patch applies."""
    contexts = [RedisContext(pipelined, f"{prefix}run:{i}") for i in range(40)]
    bad = {10: ("the key", "x\udc00y"), 20: ("deep key", nested(5000))}
    patches = [
        ctx.patch([PatchOperation("set", *bad.get(i, ("v", {"i": i})))])
        for i, ctx in enumerate(contexts)
    ]
    outcomes = await asyncio.gather(*patches, return_exceptions=True)
    assert isinstance(outcomes[10], SerializationError)
    assert "'the key'" in str(outcomes[10])
    assert "surrogate" in str(outcomes[10])
    assert isinstance(outcomes[20], SerializationError)
    assert "'deep key'" in str(outcomes[20])
    assert f"deeper than {MAX_DEPTH}" in str(outcomes[20])
    for i, ctx in enumerate(contexts):
        if i in (10, 20):
            assert await ctx.to_dict() == {}
        else:
            assert outcomes[i] is True
            assert await ctx.get("v") == {"i": i}


async def test_exact_values_in_the_hash(pipelined: AutoPipelineRedis, prefix: str) -> None:
    ctx = RedisContext(pipelined, f"{prefix}run:exact")
    await ctx.patch([PatchOperation("set", k, v) for k, v in EXACT_VALUES.items()])
    stored = await ctx.to_dict()
    assert [k for k, v in EXACT_VALUES.items() if not same_value(stored[k], v)] == []
    many = await ctx.get_many(list(EXACT_VALUES))
    assert [k for k, v in EXACT_VALUES.items() if not same_value(many[k], v)] == []


async def test_deep_and_surrogate_values_fail_their_run(start_fleet: StartFleet) -> None:
    """The issue's runs: a value 5,000 deep and a lone surrogate in a key fail their
    run at once, naming the key (they used to stay ``running`` for ever)."""

    async def deep(ctx: NodeContext) -> str:
        await ctx.set("deep", nested(5000))
        return "unreachable"

    async def surrogate(ctx: NodeContext) -> str:
        await ctx.set("x\udc00y", 1)
        return "unreachable"

    flows = [Flow("deep").node("w", deep), Flow("surrogate").node("w", surrogate)]
    fleet = await start_fleet(*flows, workers=1)
    for name, words in (("deep", ["'deep'", "deeper than"]), ("surrogate", ["x\\udc00y"])):
        result = await fleet.run(name)
        assert result.status == "failed", name
        (error,) = result.errors
        assert all(w in error["message"] for w in words), error
        assert error["type"] == "SerializationError"
    assert fleet.dead_workers() == []


async def test_bytes_bullmq_cannot_parse_are_dead_lettered(start_fleet: StartFleet) -> None:
    """Job data that is not JSON, or not UTF-8, or nested past Python's parser, put on
    the queue as stored bytes: BullMQ's fetch used to fail on it before the adapter saw
    it (the job stalled for ever). Each is dead-lettered with the reason and its raw
    bytes, promptly, and the worker goes on."""
    flow = Flow("ok").node("a", lambda c: "fine")
    fleet = await start_fleet(flow, workers=1)
    client = fleet.client
    assert isinstance(client, BullMQAdapter)
    raw = [b"\xff\xfe not utf-8", b"{not json", b"[" * 5000 + b"]" * 5000, b""]
    for body in raw:
        await client.enqueue_raw(body)
    result = await fleet.run("ok")
    assert result.status == "completed", result.errors

    async def all_parked() -> bool:
        return len(await client.dead_letters()) >= len(raw)

    await fleet.until(all_parked, "every bad job dead-lettered")
    letters = await client.dead_letters()
    assert sorted(d.body if isinstance(d.body, bytes) else d.body.encode() for d in letters) == (
        sorted(raw)
    )
    reasons = {d.body if isinstance(d.body, bytes) else d.body.encode(): d.reason for d in letters}
    assert "not UTF-8" in reasons[b"\xff\xfe not utf-8"]
    assert "not JSON" in reasons[b"{not json"]
    assert all(r.startswith("PayloadDecodeError") for r in reasons.values()), reasons
    assert fleet.dead_workers() == []
    counts = await client._get_queue().getJobCounts("active", "wait", "delayed", "failed")
    assert counts["active"] == counts["wait"] == counts["delayed"] == 0, counts
    assert counts["failed"] == len(raw)
