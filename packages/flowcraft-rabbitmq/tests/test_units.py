"""Pure logic, no servers: delay buckets, names, patch collapsing, options."""

from __future__ import annotations

import pytest

from flowcraft import PatchOperation, RuntimeOptions
from flowcraft_rabbitmq import RabbitMQAdapter
from flowcraft_rabbitmq._settings import (
    DELAY_BUCKETS_MS,
    SqlNames,
    Topology,
    delay_bucket_ms,
)
from flowcraft_rabbitmq._store import collapse


@pytest.mark.parametrize(
    ("delay", "bucket"),
    [(0, 0), (-5, 0), (1, 100), (100, 100), (101, 250), (999, 1_000), (4_000, 5_000)],
)
def test_delay_rounds_up_to_a_bucket(delay: float, bucket: int) -> None:
    assert delay_bucket_ms(delay) == bucket


def test_delay_past_the_last_bucket_is_the_last() -> None:
    assert delay_bucket_ms(10 * DELAY_BUCKETS_MS[-1]) == DELAY_BUCKETS_MS[-1]
    assert list(DELAY_BUCKETS_MS) == sorted(set(DELAY_BUCKETS_MS))


def test_topology_names_derive_from_the_queue() -> None:
    topology = Topology.for_queue("orders.jobs")
    assert topology.dead_exchange == "orders.jobs.dlx"
    assert topology.dead_queue == "orders.jobs.dead"
    assert topology.delay_queue(500) == "orders.jobs.delay.500"
    assert len(topology.delay_queues()) == len(DELAY_BUCKETS_MS)


@pytest.mark.parametrize("name", ["", "amq.jobs", "has space", "quote'", "x" * 201, "é"])
def test_bad_queue_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="queue_name"):
        Topology.for_queue(name)


def test_sql_names_are_validated_and_quoted() -> None:
    names = SqlNames.create("runs_1", "app")
    assert names.runs == '"app"."runs_1"'
    assert names.versions == '"app"."runs_1_schema"'
    assert SqlNames.create("runs").runs == '"runs"'
    for bad in ['runs"; DROP TABLE x; --', "1runs", "runs-x", "r" * 42]:
        with pytest.raises(ValueError, match="table"):
            SqlNames.create(bad)
    with pytest.raises(ValueError, match="schema"):
        SqlNames.create("runs", 'public"')


def test_collapse_keeps_the_last_operation_per_key() -> None:
    ops = [
        PatchOperation.set("a", 1),
        PatchOperation.delete("a"),
        PatchOperation.delete("b"),
        PatchOperation.set("b", 2),
        PatchOperation.set("c", 1),
        PatchOperation.set("c", 3),
        PatchOperation.delete("d"),
    ]
    deletes, sets = collapse(ops)
    assert deletes == ["a", "d"]
    assert sets == {"b": 2, "c": 3}


def _options(**overrides: object) -> dict[str, object]:
    options: dict[str, object] = {
        "runtime_options": RuntimeOptions(),
        "amqp_url": "amqp://guest:guest@127.0.0.1:1/",
        "postgres_dsn": "postgresql://postgres@127.0.0.1:1/postgres",
        "redis_url": "redis://127.0.0.1:1/0",
    }
    options.update(overrides)
    return options


def test_constructing_an_adapter_connects_to_nothing() -> None:
    adapter = RabbitMQAdapter(**_options())  # type: ignore[arg-type]
    assert adapter.retry_mode == "in-process"
    assert "guest" not in repr(adapter)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retry_mode": "bull"}, "retry_mode"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 4, "prefetch": 3}, "prefetch"),
        ({"prefetch": 65536}, "prefetch must be at most 65535"),
        ({"concurrency": 70000}, "prefetch must be at most 65535"),
        ({"concurrency": True}, "concurrency must be an int"),
        ({"redis_url": None}, "redis_url"),
        ({"amqp_url": None}, "amqp_url"),
        ({"postgres_dsn": None}, "pool= or dsn="),
        ({"table": "bad-name"}, "table"),
    ],
)
def test_bad_options_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RabbitMQAdapter(**_options(**overrides))  # type: ignore[arg-type]
