"""DurableObjectCoordinationStore: the core's store kit against Miniflare, plus where keys
live (their run's object) and the expiry rules of the object."""

from __future__ import annotations

import asyncio

import pytest

from flowcraft.distributed import CoordinationStore
from flowcraft.distributed import keys as K
from flowcraft.testing import CoordinationStoreTests
from flowcraft_cloudflare import DurableObjectContext, DurableObjectCoordinationStore, WorkerClient

# The object compares expiries with Date.now() to the millisecond.
_TTL = 0.6
_RESOLUTION = 0.2


class TestDurableObjectCoordinationStore(CoordinationStoreTests):
    short_ttl_seconds = _TTL
    ttl_resolution_seconds = _RESOLUTION

    @pytest.fixture
    def store(self, client: WorkerClient, namespace: str) -> CoordinationStore:
        return DurableObjectCoordinationStore(client, namespace=namespace)

    @pytest.fixture
    def other_store(self, client: WorkerClient, namespace: str) -> CoordinationStore:
        return DurableObjectCoordinationStore(client, namespace=namespace + "-other")


@pytest.fixture
def store(client: WorkerClient, namespace: str) -> DurableObjectCoordinationStore:
    return DurableObjectCoordinationStore(client, namespace=namespace)


@pytest.mark.parametrize(
    "key",
    [
        K.lease("flowcraft:", "run:1%", "node:a", 2),
        K.followed_up("flowcraft:", "run:1%", "n", 1),
        K.join_counter("flowcraft:", "run:1%", "j", 3),
        K.any_fired("flowcraft:", "run:1%", "j", 3),
        K.latch_counter("flowcraft:", "run:1%", 0, 4),
        K.end_counter("flowcraft:", "run:1%"),
        K.final("flowcraft:", "run:1%"),
    ],
)
def test_protocol_keys_live_in_their_runs_object(
    store: DurableObjectCoordinationStore, key: str
) -> None:
    assert store.object_for(key) == store.run_object("run:1%")


def test_other_keys_get_an_object_of_their_own(store: DurableObjectCoordinationStore) -> None:
    assert store.object_for("other:lease:r") == f"{store.namespace}/k:other:lease:r"
    assert store.object_for("flowcraft:unknown:r") == f"{store.namespace}/k:flowcraft:unknown:r"


async def test_run_keys_share_the_object_with_the_context(
    store: DurableObjectCoordinationStore, client: WorkerClient
) -> None:
    """The lease and the context of one run are one object: one batch sees both."""
    run_id = "run-shared"
    lease = K.lease("flowcraft:", run_id, "a", 1)
    assert await store.set_if_not_exist(lease, "me", 30)
    ctx = DurableObjectContext(client, store.run_object(run_id), run_id)
    results = await ctx.batch([{"op": "cget", "key": lease}, {"op": "get", "keys": []}])
    assert results[0] == {"value": "me"}


async def test_expired_counter_starts_again_and_setnx_takes_expired_key(
    store: DurableObjectCoordinationStore,
) -> None:
    key = K.join_counter("flowcraft:", "r", "j", 1)
    assert await store.increment(key, 0.3) == 1
    assert await store.increment(key, 0.3) == 2
    await asyncio.sleep(0.5)
    assert await store.get(key) is None
    assert not await store.extend_ttl(key, 5)
    assert await store.increment(key, 5) == 1
    lease = K.lease("flowcraft:", "r", "a", 1)
    assert await store.set_if_not_exist(lease, "old", 0.3)
    await asyncio.sleep(0.5)
    assert await store.set_if_not_exist(lease, "new", 5)
    assert await store.get(lease) == "new"


async def test_delete_many_one_call_per_object(
    store: DurableObjectCoordinationStore, client: WorkerClient
) -> None:
    keys = [K.join_counter("flowcraft:", "r1", "j", g) for g in range(1, 6)]
    for key in keys:
        await store.increment(key, 60)
    before = client.requests["do"]
    await store.delete_many(keys)
    assert client.requests["do"] - before == 1
    assert [await store.get(k) for k in keys] == [None] * 5
