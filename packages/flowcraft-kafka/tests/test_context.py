"""CassandraContext on the real Cassandra: exact round trips, atomic O(delta) patches,
the guarded patch (a lightweight transaction), limits, TTLs and clock skew."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from flowcraft.context import PatchOperation
from flowcraft.distributed.adapter import job_disposition
from flowcraft.errors import StateLimitError
from flowcraft_backends import RunningService
from flowcraft_kafka import (
    CassandraClient,
    CassandraContext,
    CassandraRunStore,
    PatchOutcomeUnknownError,
)

from .conftest import cassandra_settings

HOSTILE_KEYS = [
    "",
    "plain",
    "dots.in.key",
    "_outputs.a.b",
    "slash/and\\back",
    "hash#dollar$",
    "back`tick`",
    'quote\'s "double"',
    "'; DROP TABLE flowcraft_state; --",
    "nul\x00byte",
    "emoji 🚀 astral 𝄞 \U0010fffd",
    "line\nbreak\ttab\u2028sep",
    "%s {0} ${x} {{y}}",
    "k" * 1024,
    "é" * 700,
]

VALUES: list[Any] = [
    2**70,
    -(2**63),
    1e16,
    1e308,
    0.1,
    -0.0,
    "",
    "𝄞 astral and\x00nul",
    None,
    True,
    [],
    {},
    {"nested": [1, {"k": "v"}], "": 0},
]


def ctx(store: CassandraRunStore, run_id: str | None = None) -> CassandraContext:
    return CassandraContext(store, run_id or uuid.uuid4().hex)


async def test_hostile_keys_round_trip(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.patch([PatchOperation("set", k, f"value of {k}") for k in HOSTILE_KEYS])
    for k in HOSTILE_KEYS:
        assert await c.get(k) == f"value of {k}"
    assert await c.get_many([*HOSTILE_KEYS, "absent"]) == {k: f"value of {k}" for k in HOSTILE_KEYS}
    assert await c.to_dict() == {k: f"value of {k}" for k in HOSTILE_KEYS}
    await c.patch([PatchOperation("delete", k) for k in HOSTILE_KEYS[::2]])
    assert set(await c.to_dict()) == set(HOSTILE_KEYS[1::2])


@pytest.mark.parametrize("value", VALUES, ids=repr)
async def test_values_round_trip_exactly(run_store: CassandraRunStore, value: Any) -> None:
    c = ctx(run_store)
    await c.set("v", value)
    got = await c.get("v")
    assert got == value
    assert type(got) is type(value)
    assert await c.get_many(["v"]) == {"v": value}


async def test_patch_merges_operations_per_key(run_store: CassandraRunStore) -> None:
    """A batch cannot order its statements (one timestamp, a delete wins a tie): the
    last operation on a key must win anyway."""
    c = ctx(run_store)
    await c.patch([PatchOperation("set", "a", 1), PatchOperation("set", "b", 1)])
    await c.patch(
        [
            PatchOperation("delete", "a"),
            PatchOperation("set", "a", 2),  # delete then set: set
            PatchOperation("set", "b", 2),
            PatchOperation("delete", "b"),  # set then delete: gone
            PatchOperation("set", "c", 1),
            PatchOperation("set", "c", 3),
        ]
    )
    assert await c.to_dict() == {"a": 2, "c": 3}


async def test_patch_is_one_request_whatever_the_state_size(
    run_store: CassandraRunStore,
) -> None:
    c = ctx(run_store)
    await c.patch([PatchOperation("set", f"big{i}", "x" * 100_000) for i in range(20)])
    await c.get("warm")  # statements prepared
    client = run_store.client
    before = client.requests
    await c.patch([PatchOperation("set", "small", 1), PatchOperation("delete", "big0")])
    assert client.requests - before == 1
    before = client.requests
    assert await c.get_many(["small", "big1"]) == {"small": 1, "big1": "x" * 100_000}
    assert client.requests - before == 1


async def test_get_many_reads_long_key_lists(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.patch([PatchOperation("set", f"k{i}", i) for i in range(250)])
    found = await c.get_many([f"k{i}" for i in range(300)])
    assert found == {f"k{i}": i for i in range(250)}


async def test_concurrent_patches_lose_nothing(run_store: CassandraRunStore) -> None:
    """Row per key: patches of different keys never overwrite each other (the original's
    JSON blob read-modify-write lost these)."""
    c = ctx(run_store)
    await asyncio.gather(*(c.set(f"w{i}", i) for i in range(100)))
    assert await c.to_dict() == {f"w{i}": i for i in range(100)}


async def test_runs_are_separate_partitions(run_store: CassandraRunStore) -> None:
    a, b = ctx(run_store), ctx(run_store)
    await a.set("k", "a")
    assert await b.get("k") is None
    assert await b.to_dict() == {}


async def test_key_too_long_is_a_state_limit_error(run_store: CassandraRunStore) -> None:
    c = ctx(run_store, "run-long-key")
    with pytest.raises(StateLimitError, match="run-long-key") as info:
        await c.set("k" * 70_000, 1)
    assert "70000 bytes" in str(info.value)
    assert await c.to_dict() == {}


async def test_patch_over_the_limit_is_a_state_limit_error(
    cassandra_client: CassandraClient, namespace: str
) -> None:
    store = CassandraRunStore(cassandra_client, namespace, max_patch_bytes=10_000)
    c = ctx(store, "run-big")
    with pytest.raises(StateLimitError, match="run-big") as info:
        await c.patch(
            [PatchOperation("set", "small", 1), PatchOperation("set", "huge", "x" * 20_000)]
        )
    assert "'huge'" in str(info.value)
    assert await c.to_dict() == {}  # nothing of the patch was written


async def test_a_megabyte_value_fits(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.set("mb", "y" * 1024 * 1024)
    assert await c.get("mb") == "y" * 1024 * 1024


async def test_writes_expire_after_their_ttl(
    cassandra_client: CassandraClient, namespace: str
) -> None:
    store = CassandraRunStore(cassandra_client, namespace, ttl_seconds=1)
    c = ctx(store)
    await c.set("k", 1)
    assert await c.get("k") == 1
    await asyncio.sleep(2.2)
    assert await c.get("k") is None


# ---------------------------------------------------------------- the guarded patch


async def test_guard_absent_key(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    assert await c.patch(
        [PatchOperation("set", "_flowcraft.n.a", 1)], guard={"_flowcraft.n.a": None}
    )
    assert not await c.patch([PatchOperation("set", "x", 1)], guard={"_flowcraft.n.a": None})
    assert await c.to_dict() == {"_flowcraft.n.a": 1}


async def test_guard_equal_and_not_equal(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.patch([PatchOperation("set", "_flowcraft.n.a", 2), PatchOperation("set", "s", "x")])
    assert not await c.patch(
        [PatchOperation("set", "_flowcraft.n.a", 9)], guard={"_flowcraft.n.a": 1}
    )
    assert await c.patch(
        [PatchOperation("set", "_flowcraft.n.a", 3), PatchOperation("set", "out", "ok")],
        guard={"_flowcraft.n.a": 2, "s": "x"},
    )
    assert await c.to_dict() == {"_flowcraft.n.a": 3, "s": "x", "out": "ok"}


@pytest.mark.parametrize(
    ("stored", "guard"),
    [("3", 3), (3, "3"), (3.0, 3), (True, 1), ([3], 3), ({"a": 1}, "a"), (None, 0)],
)
async def test_guard_of_another_type_never_matches(
    run_store: CassandraRunStore, stored: Any, guard: int | str
) -> None:
    c = ctx(run_store)
    await c.set("g", stored)
    assert not await c.patch([PatchOperation("set", "w", 1)], guard={"g": guard})
    assert await c.get("w") is None


async def test_guard_on_several_keys_all_or_nothing(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.patch([PatchOperation("set", "a", 1), PatchOperation("set", "b", "two")])
    assert not await c.patch(
        [PatchOperation("set", "c", 1), PatchOperation("delete", "a")],
        guard={"a": 1, "b": "two", "absent": None, "c": 5},
    )
    assert await c.to_dict() == {"a": 1, "b": "two"}
    assert await c.patch(
        [PatchOperation("set", "c", 1), PatchOperation("delete", "a")],
        guard={"a": 1, "b": "two", "absent": None, "c": None},
    )
    assert await c.to_dict() == {"b": "two", "c": 1}


async def test_guard_with_hostile_keys(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    guard: dict[str, int | str | None] = dict.fromkeys(HOSTILE_KEYS)
    assert await c.patch([PatchOperation("set", k, 1) for k in HOSTILE_KEYS], guard=guard)
    assert not await c.patch([PatchOperation("set", "x", 1)], guard=guard)
    assert await c.patch([PatchOperation("set", "x", 1)], guard=dict.fromkeys(HOSTILE_KEYS, 1))


async def test_guard_racers_exactly_one_wins(run_store: CassandraRunStore) -> None:
    c = ctx(run_store)
    await c.set("_flowcraft.n.x", 4)

    async def racer(i: int) -> bool:
        return await c.patch(
            [PatchOperation("set", "_flowcraft.n.x", 5), PatchOperation("set", f"by{i}", i)],
            guard={"_flowcraft.n.x": 4},
        )

    won = await asyncio.gather(*(racer(i) for i in range(20)))
    assert sum(won) == 1
    winner = won.index(True)
    assert await c.to_dict() == {"_flowcraft.n.x": 5, f"by{winner}": winner}


async def test_guard_timeout_is_an_unknown_outcome_handed_back(
    cassandra_service: RunningService,
    keyspace: str,
    cassandra_client: CassandraClient,
    namespace: str,
) -> None:
    """A lightweight transaction that times out may still be applied: it is neither
    True nor False but an error the adapter hands back (the job is delivered again
    and reads what happened)."""
    impatient = await CassandraClient.connect(
        cassandra_settings(cassandra_service, keyspace).model_copy(
            update={"request_timeout": 0.0001}
        )
    )
    try:
        store = CassandraRunStore(impatient, namespace)
        await store.statements()
        c = ctx(store, "run-timeout")
        with pytest.raises(PatchOutcomeUnknownError, match="run-timeout") as info:
            await c.patch([PatchOperation("set", "n", 1)], guard={"n": None})
        assert job_disposition(info.value) == "retry"
    finally:
        await impatient.aclose()
    # Whatever happened, the patch applied at most once and a retry sees the truth.
    await asyncio.sleep(1.0)
    again = CassandraContext(CassandraRunStore(cassandra_client, namespace), "run-timeout")
    before = await again.get("n")
    applied = await again.patch([PatchOperation("set", "n", 1)], guard={"n": None})
    assert applied == (before is None)
    assert await again.get("n") == 1


# ---------------------------------------------------------------- clock skew


def _skewed(seconds: float) -> Any:
    def now_micros() -> int:
        return int((time.time() + seconds) * 1_000_000)

    return now_micros


async def test_client_clock_skew_cannot_hide_a_later_write(
    cassandra_client: CassandraClient, namespace: str
) -> None:
    """Two workers, one clock an hour ahead and one an hour behind: the later write
    wins, plain and guarded, because the coordinator stamps the writes."""
    store = CassandraRunStore(cassandra_client, namespace)
    c = ctx(store)
    cluster = cassandra_client.cluster
    real = cluster.timestamp_generator
    try:
        cluster.timestamp_generator = _skewed(+3600)
        await c.set("k", "ahead")
        cluster.timestamp_generator = _skewed(-3600)
        await c.set("k", "behind, but later")
        assert await c.get("k") == "behind, but later"
        cluster.timestamp_generator = _skewed(+3600)
        await c.set("n", 1)
        cluster.timestamp_generator = _skewed(-3600)
        assert await c.patch([PatchOperation("set", "n", 2)], guard={"n": 1})
        assert await c.get("n") == 2
        await c.set("n", 3)  # a plain write after a transaction
        assert await c.get("n") == 3
        assert await c.patch([PatchOperation("delete", "n")], guard={"n": 3})
        assert await c.get("n") is None
    finally:
        cluster.timestamp_generator = real


async def test_skewed_client_timestamps_do_hide_writes(
    cassandra_client: CassandraClient, namespace: str
) -> None:
    """The control: with client timestamps (the driver's default) the same skew hides
    the later write, so the test above really exercises skew."""
    store = CassandraRunStore(cassandra_client, namespace)
    statements = await store.statements()
    session = cassandra_client.session
    cluster = cassandra_client.cluster
    real = cluster.timestamp_generator
    session.use_client_timestamp = True
    try:
        cluster.timestamp_generator = _skewed(+3600)
        await cassandra_client.execute(statements.set, (3600, '"ahead"', namespace, "r", "k"))
        cluster.timestamp_generator = _skewed(-3600)
        await cassandra_client.execute(statements.set, (3600, '"later"', namespace, "r", "k"))
    finally:
        session.use_client_timestamp = False
        cluster.timestamp_generator = real
    assert await CassandraContext(store, "r").get("k") == "ahead"
