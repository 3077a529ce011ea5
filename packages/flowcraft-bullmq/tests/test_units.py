"""Unit tests without a backend: options, key formats the fused scripts rebuild, JSON."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from flowcraft import JsonSerializer, NodeDefinition, SerializationError
from flowcraft.distributed import keys as K
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft_bullmq import BullMQSettings
from flowcraft_bullmq._fastpath import make_read_plan
from flowcraft_bullmq._settings import RedisKeys
from flowcraft_bullmq.adapter import BullMQAdapter
from flowcraft_bullmq.context import decode, encode

HOSTILE = ["a:b", "quote'\"", "dots.in.id", "73519", "é 中文 🚀", "x" * 300, "%3A", "g:1"]


def test_defaults_recover_a_dead_worker_within_seconds() -> None:
    s = BullMQSettings()
    options = s.worker_options()
    assert options["lockDuration"] == 4000
    assert options["stalledInterval"] == 2000
    assert options["autorun"] is False
    assert s.lease_seconds <= 5
    assert options["prefix"] == "flowcraft:bull"


def test_settings_reject_unknown_and_invalid_options() -> None:
    with pytest.raises(ValidationError):
        BullMQSettings(queue="x")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        BullMQSettings(retry_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        BullMQSettings(concurrency=0)


@pytest.mark.parametrize("node_id", HOSTILE)
def test_read_plan_rebuilds_the_base_keys(node_id: str) -> None:
    first = BaseDistributedAdapter.first_read_keys(node_id)
    plan = make_read_plan(first, node_id, "{}", [K.output("p")], [])
    for g in (1, 2, 10, 73519, 123456):
        assert plan.activation(g) == K.activation(node_id, g)
    assert plan.waiting_field == K.waiting(node_id)
    assert plan.resolved_field == K.resolved(node_id)


def test_read_plan_refuses_a_first_read_it_cannot_fuse() -> None:
    with pytest.raises(ValueError, match="first read"):
        make_read_plan([K.META, K.resolved("x")], "x", "{}", [], [])


@pytest.mark.parametrize("run_id", HOSTILE)
@pytest.mark.parametrize("node_id", HOSTILE)
def test_lease_stem_is_the_base_lease_key_without_its_generation(run_id: str, node_id: str) -> None:
    stem = K.lease_stem("pfx:", run_id, node_id)
    for g in (1, 9, 73519):
        assert f"{stem}{g}" == K.lease("pfx:", run_id, node_id, g)


@pytest.mark.parametrize(
    "value", [None, 1, 1.5, "é 中文 🚀", {"a": [1, {"b": None}]}, [], "x" * 2000, {"k\"'": "v"}]
)
def test_json_matches_flowcraft_serializer(value: object) -> None:
    assert encode(value) == JsonSerializer().dumps(value)
    assert decode(encode(value).encode()) == value
    assert decode(encode(value)) == value


def test_json_refuses_what_the_serializer_refuses() -> None:
    with pytest.raises(SerializationError):
        encode(math.nan)
    with pytest.raises(SerializationError):
        encode(object())
    with pytest.raises(SerializationError):
        decode(b"{not json")


def test_queue_retry_options_follow_the_node_config() -> None:
    node = NodeDefinition.model_validate(
        {"id": "n", "uses": "n", "config": {"maxRetries": 3, "retryDelay": 250}}
    )
    options = BullMQAdapter.get_queue_retry_options(None, node)  # type: ignore[arg-type]
    assert options == {"attempts": 3, "backoff": {"type": "exponential", "delay": 250}}
    single = NodeDefinition(id="s", uses="s")
    assert BullMQAdapter.get_queue_retry_options(None, single) is None  # type: ignore[arg-type]


def test_state_and_result_keys_cannot_collide() -> None:
    keys = RedisKeys("p:")
    assert keys.state("a") != keys.result("a")
    assert keys.state("result:a") != keys.result("a")
