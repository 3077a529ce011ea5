"""Values in DynamoDB (issue 22): every JSON value comes back exactly, and a value no
store can keep is refused before any request, naming its key."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, PatchOperation, RuntimeOptions, SerializationError
from flowcraft.testing import Fleet
from flowcraft.testing.fidelity import EXACT_VALUES, nested, same_value
from flowcraft_sqs import AwsClients, DynamoDbContext, QueueUrls, RunTable, SqsAdapter

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def ctx(clients: AwsClients, table: str) -> DynamoDbContext:
    runs = RunTable(clients, table, namespace=f"t-{uuid.uuid4().hex[:8]}")
    return runs.context(f"run-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def requests(clients: AwsClients) -> Iterator[list[str]]:
    seen: list[str] = []

    def capture(params: dict[str, Any], model: Any, **_: Any) -> None:
        seen.append(model.name)

    events = clients.dynamodb.meta.events
    events.register("provide-client-params.dynamodb.*", capture)
    yield seen
    events.unregister("provide-client-params.dynamodb.*", capture)


async def test_exact_values(ctx: DynamoDbContext) -> None:
    await ctx.patch([PatchOperation("set", k, v) for k, v in EXACT_VALUES.items()])
    many = await ctx.get_many(list(EXACT_VALUES))
    state = await ctx.to_dict()
    for key, value in EXACT_VALUES.items():
        assert same_value(await ctx.get(key), value), key
        assert same_value(many[key], value), key
        assert same_value(state[key], value), key


async def test_unstorable_values_refused_before_any_request(
    ctx: DynamoDbContext, requests: list[str]
) -> None:
    for key, value, words in (
        ("surrogate", {"a": "x\udc00"}, "surrogate"),
        ("x\udc00y", 1, "surrogate"),
        ("deep", nested(5000), "deeper than"),
        ("inf", float("inf"), "Infinity"),
    ):
        with pytest.raises(SerializationError, match=words) as caught:
            await ctx.patch([PatchOperation("set", "fine", 1), PatchOperation("set", key, value)])
        assert repr(key) in str(caught.value)
    assert requests == []


async def test_deep_value_fails_its_run_with_the_key(
    clients: AwsClients, table: str, queues: QueueUrls
) -> None:
    """The issue's run: a value 5,000 deep used to be dead-lettered after 10 receives
    with no reason while the run said ``running``; it now fails the run at once."""

    async def deep(ctx: NodeContext) -> str:
        await ctx.set("deep", nested(5000))
        return "unreachable"

    flow = Flow("deep").node("w", deep).node("after", lambda c: c.input).chain("w", "after")
    namespace = f"t-{uuid.uuid4().hex[:8]}"

    def build(options: RuntimeOptions, **kw: Any) -> SqsAdapter:
        return SqsAdapter(
            runtime_options=options,
            queue_url=queues.queue_url,
            table_name=table,
            clients=clients,
            namespace=namespace,
            wait_time_seconds=1,
            **kw,
        )

    fleet = Fleet(build, RuntimeOptions.from_flows(flow), timeout=60)
    await fleet.start(1)
    try:
        result = await fleet.run("deep")
    finally:
        await fleet.stop()
    assert result.status == "failed"
    (error,) = result.errors
    assert "'deep'" in error["message"]
    assert "deeper than" in error["message"]
    assert "_outputs.after" not in result.context
