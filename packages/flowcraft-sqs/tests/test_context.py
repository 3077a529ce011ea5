"""DynamoDbContext against moto: one UpdateItem per patch, hostile keys, the size limit,
expiry without deletion, the result item."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flowcraft import StateLimitError
from flowcraft.context import AsyncContext, PatchOperation
from flowcraft.testing import ContextStoreTests
from flowcraft.testing.adapter import HOSTILE_KEYS
from flowcraft_sqs import AwsClients, DynamoDbContext, RunTable


@pytest.fixture
def runs(clients: AwsClients, table: str) -> RunTable:
    return RunTable(clients, table, namespace=f"t-{uuid.uuid4().hex[:8]}", max_state_bytes=20_000)


@pytest.fixture
def ctx(runs: RunTable) -> DynamoDbContext:
    return runs.context(f"run-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def requests(clients: AwsClients) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every DynamoDB request the test makes: (operation, parameters)."""
    seen: list[tuple[str, dict[str, Any]]] = []

    def capture(params: dict[str, Any], model: Any, **_: Any) -> None:
        seen.append((model.name, params))

    events = clients.dynamodb.meta.events
    events.register("provide-client-params.dynamodb.*", capture)
    yield seen
    events.unregister("provide-client-params.dynamodb.*", capture)


def _raw_item(ctx: DynamoDbContext) -> dict[str, Any]:
    item: dict[str, Any] = ctx.table.clients.dynamodb.get_item(
        TableName=ctx.table.table_name, Key=ctx._key, ConsistentRead=True
    ).get("Item", {})
    return item


async def test_patch_is_one_update_with_keys_only_in_attribute_names(
    ctx: DynamoDbContext, requests: list[tuple[str, dict[str, Any]]]
) -> None:
    await ctx.patch([PatchOperation.set(k, {"v": k}) for k in HOSTILE_KEYS[:3]])
    requests.clear()
    ops = [PatchOperation.set(k, {"value": k, "n": i}) for i, k in enumerate(HOSTILE_KEYS)]
    ops.append(PatchOperation.delete(HOSTILE_KEYS[1]))
    await ctx.patch(ops)
    updates = [p for op, p in requests if op == "UpdateItem"]
    # The patch, then one small update of the size ledger (two values were replaced).
    assert len(updates) == 2
    patch = updates[0]
    expression = patch["UpdateExpression"]
    assert expression.startswith("SET ")
    assert " REMOVE " in expression
    for key in HOSTILE_KEYS:
        assert key not in expression
        assert key not in patch.get("ConditionExpression", "")
    assert set(patch["ExpressionAttributeNames"].values()) >= {"c:" + k for k in HOSTILE_KEYS}
    assert updates[1]["UpdateExpression"] == "ADD #sz :d"


async def test_hostile_keys_round_trip(ctx: DynamoDbContext) -> None:
    keys = [*HOSTILE_KEYS, "#n0", ":v0", "c:x", "", "nul \x00", "sz", "pk"]
    values = {k: {"for": k, "list": [1, 2.5, None, True], "text": "é 中文 🚀"} for k in keys}
    await ctx.patch([PatchOperation.set(k, v) for k, v in values.items()])
    assert await ctx.get_many(keys) == values
    assert await ctx.to_dict() == values
    for key in keys:
        assert await ctx.get(key) == values[key]
        assert await ctx.has(key)
    assert await ctx.get_many(["absent", keys[0]]) == {keys[0]: values[keys[0]]}
    assert not await ctx.has("absent")


async def test_get_many_is_one_read_and_splits_only_past_the_expression_limit(
    ctx: DynamoDbContext, requests: list[tuple[str, dict[str, Any]]]
) -> None:
    await ctx.patch([PatchOperation.set(f"k{i}", i) for i in range(150)])
    requests.clear()
    assert await ctx.get_many(["k1", "k2", "k3"]) == {"k1": 1, "k2": 2, "k3": 3}
    assert [op for op, _ in requests] == ["GetItem"]
    requests.clear()
    wanted = [f"k{i}" for i in range(1500)]
    assert await ctx.get_many(wanted) == {f"k{i}": i for i in range(150)}
    reads = [p for op, p in requests if op == "GetItem"]
    assert len(reads) > 1
    assert all(len(p["ProjectionExpression"]) <= 4096 for p in reads)


async def test_set_and_delete_and_last_operation_wins(ctx: DynamoDbContext) -> None:
    await ctx.set("a", 1)
    await ctx.patch(
        [PatchOperation.set("a", 2), PatchOperation.delete("a"), PatchOperation.set("b", 1)]
    )
    assert await ctx.to_dict() == {"b": 1}
    await ctx.patch([PatchOperation.delete("b"), PatchOperation.set("b", 3)])
    assert await ctx.to_dict() == {"b": 3}
    await ctx.delete("b")
    assert await ctx.to_dict() == {}


async def test_state_limit_is_a_clear_error_and_writes_nothing(ctx: DynamoDbContext) -> None:
    await ctx.patch([PatchOperation.set("small", "x" * 1000)])
    with pytest.raises(StateLimitError, match=r"limit is 20,000 bytes") as failure:
        await ctx.patch([PatchOperation.set("huge", "y" * 30_000), PatchOperation.set("other", 1)])
    assert "S3" in str(failure.value)
    for _ in range(3):
        await ctx.patch([PatchOperation.set(f"part{_}", "z" * 5_000)])
    with pytest.raises(StateLimitError, match="after this patch"):
        await ctx.patch([PatchOperation.set("more", "w" * 5_000), PatchOperation.set("o", 1)])
    state = await ctx.to_dict()
    assert "more" not in state
    assert "o" not in state
    assert "huge" not in state
    assert set(state) == {"small", "part0", "part1", "part2"}


async def test_near_the_limit_overwrites_and_removals_still_fit(ctx: DynamoDbContext) -> None:
    for i in range(3):
        await ctx.set(f"part{i}", "a" * 5_500)
    # 16.5 KB of 20 KB: replacing a 5.5 KB value by another fits only if the old one
    # is not counted twice (the slow path counts exactly).
    await ctx.set("part0", "b" * 5_500)
    await ctx.patch([PatchOperation.delete("part1"), PatchOperation.set("new", "c" * 5_000)])
    assert set(await ctx.to_dict()) == {"part0", "part2", "new"}
    item = _raw_item(ctx)
    exact = sum(
        len(name.encode()) + len(value["S"].encode())
        for name, value in item.items()
        if name.startswith("c:")
    )
    assert int(item["sz"]["N"]) == exact


async def test_dynamodb_size_error_becomes_state_limit_error(
    clients: AwsClients, table: str
) -> None:
    # Past the ledger (a limit above the real one): DynamoDB's own refusal is translated.
    runs = RunTable(clients, table, namespace="big")
    object.__setattr__(runs, "max_state_bytes", 600_000)
    ctx = runs.context("r")
    await ctx.set("a", "x" * 250_000)
    with pytest.raises(StateLimitError, match="400 KB"):
        await ctx.set("b", "y" * 250_000)
    assert set(await ctx.to_dict()) == {"a"}
    # The result item has no ledger: DynamoDB refuses, the error says what happened.
    with pytest.raises(StateLimitError, match="final result does not fit"):
        await runs.write_result("r", {"context": {"a": "z" * 410_000}})


async def test_patch_with_too_many_operations_is_refused(ctx: DynamoDbContext) -> None:
    with pytest.raises(StateLimitError, match="4 KB expression limit"):
        await ctx.patch([PatchOperation.set(f"key{i}", i) for i in range(400)])
    assert await ctx.to_dict() == {}


async def test_expired_run_reads_as_absent_and_restarts_clean(
    clients: AwsClients, table: str
) -> None:
    short = RunTable(clients, table, namespace="ttl", state_ttl_seconds=0.001)
    ctx = short.context("r")
    await ctx.patch([PatchOperation.set("stale", 1), PatchOperation.set("other", 2)])
    assert _raw_item(ctx), "moto never deletes expired items"
    assert await ctx.get_many(["stale", "other"]) == {}
    assert await ctx.to_dict() == {}
    fresh = RunTable(clients, table, namespace="ttl").context("r")
    await fresh.patch([PatchOperation.set("new", 3)])
    assert await fresh.to_dict() == {"new": 3}


async def test_final_result_lives_in_its_own_item_first_write_wins(
    ctx: DynamoDbContext, runs: RunTable
) -> None:
    first = {"status": "completed", "errors": [], "context": {"a": 1}}
    await runs.write_result(ctx.run_id, first)
    await runs.write_result(ctx.run_id, {"status": "completed", "context": {"a": 2}})
    assert await runs.read_result(ctx.run_id) == first
    assert _raw_item(ctx) == {}, "the run's own item is untouched"
    assert await runs.read_result("other-run") is None


async def test_long_run_ids_are_hashed_into_the_key(clients: AwsClients, table: str) -> None:
    runs = RunTable(clients, table, namespace="long")
    long_id = "ü" * 1500
    ctx = runs.context(long_id)
    await ctx.set("k", 1)
    assert runs.context(long_id) is not ctx
    assert await runs.context(long_id).get("k") == 1
    assert await runs.context("ü" * 1499).get("k") is None
    assert runs.run_id_of(_raw_item(ctx)) == long_id


class TestDynamoDbContextKit(ContextStoreTests):
    """The context kit (guarded patch included) on moto's DynamoDB."""

    @pytest.fixture
    def context(self, runs: RunTable) -> AsyncContext:
        return runs.context(f"run-{uuid.uuid4().hex[:8]}")

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        assert isinstance(context, DynamoDbContext)
        return context.table.context(context.run_id)
