"""The in-memory store copies values as JSON would, without recursion, and refuses
values nesting deeper than every store allows (instead of a RecursionError that
left the job redelivered for ever)."""

from __future__ import annotations

from typing import Any

from flowcraft import Flow, RuntimeOptions
from flowcraft.distributed.memory import InMemoryAdapter, _copy
from flowcraft.serializer import MAX_DEPTH


def nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def test_copy_is_deep_and_keeps_order() -> None:
    inner = {"z": 1, "a": [1, {"b": None}]}
    value = {"first": inner, "second": [inner, "x"], "n": 3}
    copied = _copy(value)
    assert copied == value
    assert list(copied) == ["first", "second", "n"]
    assert list(copied["first"]) == ["z", "a"]
    assert copied["first"] is not inner
    assert copied["second"][0] is not copied["first"]  # no shared objects either
    assert _copy(nested(MAX_DEPTH)) == nested(MAX_DEPTH)


async def test_a_value_nesting_too_deep_fails_the_run_naming_the_key() -> None:
    flow = (
        Flow("deep")
        .node("ok", lambda c: nested(MAX_DEPTH))
        .node("deep", lambda c: nested(50_000))
        .edge("ok", "deep")
    )
    adapter = InMemoryAdapter(runtime_options=RuntimeOptions.from_flows(flow))
    run_id = await adapter.start_run("deep")
    await adapter.run_until_idle(10)
    result = await adapter.wait_for_result(run_id, 5)
    assert result.status == "failed"
    assert result.context["_outputs.ok"] == nested(MAX_DEPTH)
    [error] = result.errors
    assert error["nodeId"] == "deep"
    assert error["type"] == "SerializationError"
    assert error["message"].startswith("context key '_outputs.deep': cannot store the value")
