"""RedisCoordinationStore against a real Redis: the conformance kit, plus Redis specifics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.connection import SSLConnection

from flowcraft.distributed import CoordinationStore, RedisCoordinationStore
from flowcraft.testing import CoordinationStoreTests
from flowcraft_backends import RunningService

# Redis expires keys to the millisecond; these keep the TTL tests to a few seconds.
_TTL = 0.6
_RESOLUTION = 0.15


def _prefix() -> str:
    return f"flowcraft-test:{uuid.uuid4().hex}:"


async def _drop_namespace(url: str, prefix: str) -> None:
    client = redis_asyncio.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _namespaced_store(
    url: str, *, given_client: bool
) -> AsyncIterator[RedisCoordinationStore]:
    """A store on its own key prefix, dropped after: owning its client, or given one that
    decodes responses to str (both decode settings must work)."""
    prefix = _prefix()
    try:
        if given_client:
            pool = redis_asyncio.BlockingConnectionPool.from_url(url, decode_responses=True)
            client = redis_asyncio.Redis.from_pool(pool)
            try:
                yield RedisCoordinationStore(client, key_prefix=prefix)
            finally:
                await client.aclose()
        else:
            async with RedisCoordinationStore(url=url, key_prefix=prefix) as store:
                yield store
    finally:
        await _drop_namespace(url, prefix)


class TestRedisCoordinationStore(CoordinationStoreTests):
    """A store that owns its client, made from the URL (bytes responses)."""

    short_ttl_seconds = _TTL
    ttl_resolution_seconds = _RESOLUTION
    given_client: ClassVar[bool] = False

    @pytest.fixture
    async def store(self, redis_service: RunningService) -> AsyncIterator[CoordinationStore]:
        async with _namespaced_store(redis_service.url, given_client=self.given_client) as store:
            yield store

    @pytest.fixture
    async def other_store(self, redis_service: RunningService) -> AsyncIterator[CoordinationStore]:
        async with _namespaced_store(redis_service.url, given_client=self.given_client) as store:
            yield store


class TestRedisCoordinationStoreGivenClient(TestRedisCoordinationStore):
    """A store given the caller's client, which decodes responses to str."""

    given_client = True


@pytest.fixture
async def raw(redis_service: RunningService) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_asyncio.Redis.from_url(redis_service.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_service: RunningService) -> AsyncIterator[RedisCoordinationStore]:
    async with _namespaced_store(redis_service.url, given_client=False) as store:
        yield store


async def test_keys_live_under_the_prefix_with_a_ttl(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    await store.set_if_not_exist("lock", "w1", 30)
    await store.increment("join", 30)
    assert await raw.get(store.key_prefix + "lock") == "w1"
    assert await raw.get(store.key_prefix + "join") == "1"
    for key in ("lock", "join"):
        assert 0 < await raw.pttl(store.key_prefix + key) <= 30_000
    assert await raw.get("lock") is None


async def test_increment_gives_a_ttl_to_a_counter_that_has_none(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    await raw.set(store.key_prefix + "n", "5")
    assert await store.increment("n", 30) == 6
    assert 0 < await raw.pttl(store.key_prefix + "n") <= 30_000


async def test_increment_keeps_an_existing_ttl(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    await store.increment("n", 100)
    await store.increment("n", 5)
    assert await raw.pttl(store.key_prefix + "n") > 5_000


@pytest.mark.parametrize("lanes", [None, 0], ids=["lanes", "client"])
async def test_each_method_is_one_round_trip(
    redis_service: RunningService, lanes: int | None
) -> None:
    """Counted by the server (MONITOR: the commands of this store's keys, not those a
    script runs), on lanes (the default for a store made from a URL) and through the
    client (``lanes=0``)."""
    prefix = _prefix()
    store = RedisCoordinationStore(url=redis_service.url, key_prefix=prefix, lanes=lanes)
    watcher = redis_asyncio.Redis.from_url(redis_service.url)
    seen: list[str] = []
    ready = asyncio.Event()
    last = asyncio.Event()

    async def watch() -> None:
        async with watcher.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                if command["client_type"] != "lua" and prefix in command["command"]:
                    seen.append(command["command"].split(" ", 1)[0].strip('"').upper())
                    if f"{prefix}end" in command["command"]:
                        last.set()

    await store.increment("warm-up", 30)  # loads the script into the server's cache
    watching = asyncio.ensure_future(watch())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        operations: list[Callable[[], Awaitable[object]]] = [
            lambda: store.increment("n", 30),
            lambda: store.set_if_not_exist("k", "v", 30),
            lambda: store.extend_ttl("k", 30),
            lambda: store.get("k"),
            lambda: store.delete("k"),
            lambda: store.delete_many(["a", "b", "n"]),  # one DEL (a run's counters)
            lambda: store.delete_many([]),  # nothing sent
        ]
        for operation in operations:
            await operation()
        await store.set_if_not_exist("end", "1", 30)  # the last one MONITOR shows
        await asyncio.wait_for(last.wait(), 10)
        assert seen == ["EVALSHA", "SET", "PEXPIRE", "GET", "DEL", "DEL", "SET"]
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await watcher.aclose()
        await store.aclose()
        await _drop_namespace(redis_service.url, prefix)


async def test_delete_many_deletes_those_keys_only(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    for key in ("a", "b", "c"):
        await store.increment(key, 30)
    await raw.set("a", "outside the prefix")
    try:
        await store.delete_many(["a", "b", "absent"])
        assert await store.get("a") is None
        assert await store.get("b") is None
        assert await store.get("c") == "1"
        assert await raw.get("a") == "outside the prefix"
    finally:
        await raw.delete("a")


@pytest.mark.parametrize("lanes", [None, 0], ids=["lanes", "client"])
async def test_set_all_if_not_exist_writes_together(
    redis_service: RunningService, raw: redis_asyncio.Redis, lanes: int | None
) -> None:
    """Each key set with its TTL unless present; the store's next command reads its own
    reply (the batch's replies were all consumed)."""
    prefix = _prefix()
    store = RedisCoordinationStore(url=redis_service.url, key_prefix=prefix, lanes=lanes)
    try:
        await raw.set(prefix + "a", "kept")
        await store.set_all_if_not_exist([("a", "1", 30), ("b", "2", 30), ("c", "3", 0.5)])
        assert await raw.mget([prefix + k for k in "abc"]) == ["kept", "2", "3"]
        assert 0 < await raw.pttl(prefix + "c") <= 500
        assert await store.increment("n", 30) == 1
        await store.set_all_if_not_exist([])
    finally:
        await store.aclose()
        await _drop_namespace(redis_service.url, prefix)


async def test_lost_lanes_are_replaced(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    """The server drops the store's connections: a command on a lost lane is sent
    again through the client (the lane dropped); those that met a lost pooled
    connection fail as they did before lanes; the next commands all run, on new lanes."""
    assert sorted(await asyncio.gather(*(store.increment("n", 30) for _ in range(12)))) == list(
        range(1, 13)
    )
    me = await raw.client_id()
    for client in await raw.client_list():
        if int(client["id"]) != me and client["cmd"] in ("evalsha", "get"):
            await raw.client_kill_filter(_id=client["id"])
    first = await asyncio.gather(
        *(store.increment("n", 30) for _ in range(12)), return_exceptions=True
    )
    ran = [x for x in first if isinstance(x, int)]
    assert ran, "commands on lost lanes run through the client"
    after = await asyncio.gather(*(store.increment("n", 30) for _ in range(12)))
    assert max(after) == 12 + len(ran) + 12
    assert await raw.get(store.key_prefix + "n") == str(max(after))


@pytest.mark.parametrize("max_connections", [1, 2, 4])
async def test_a_small_pool_leaves_the_client_a_connection(
    redis_service: RunningService, max_connections: int
) -> None:
    """Lanes keep their connections: with a pool of N, at most N - 1 lanes, so the
    commands that find every lane busy still get a connection (they waited for the
    pool's timeout, then failed, when lanes held them all)."""
    store = RedisCoordinationStore(
        url=redis_service.url, key_prefix=_prefix(), max_connections=max_connections, timeout=5
    )
    try:
        async with asyncio.timeout(20):
            counts = await asyncio.gather(*(store.increment("n", 30) for _ in range(20)))
        assert sorted(counts) == list(range(1, 21))
    finally:
        await store.aclose()


async def test_script_cache_flush_is_survived(
    store: RedisCoordinationStore, raw: redis_asyncio.Redis
) -> None:
    assert await store.increment("n", 30) == 1
    await raw.script_flush()
    assert await store.increment("n", 30) == 2


async def test_aclose_keeps_a_given_client_open(redis_service: RunningService) -> None:
    client = redis_asyncio.Redis.from_url(redis_service.url)
    try:
        store = RedisCoordinationStore(client, key_prefix=_prefix())
        await store.aclose()
        assert await client.ping()
    finally:
        await client.aclose()


async def test_aclose_closes_an_owned_client(
    redis_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisCoordinationStore(url=redis_service.url, key_prefix=_prefix())
    closed: list[bool] = []
    original = store.client.aclose

    async def spy(*args: Any, **kwargs: Any) -> None:
        closed.append(True)
        await original(*args, **kwargs)

    monkeypatch.setattr(store.client, "aclose", spy)
    await store.aclose()
    assert closed == [True]


def test_client_options_reach_the_client_and_tls_is_used() -> None:
    store = RedisCoordinationStore(
        url="rediss://:s3cret@127.0.0.1:6390/0", ssl_cert_reqs="none", socket_timeout=3
    )
    pool = store.client.connection_pool
    assert isinstance(pool, redis_asyncio.BlockingConnectionPool)
    assert pool.connection_class is SSLConnection
    assert pool.connection_kwargs["socket_timeout"] == 3
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"


def test_password_never_reaches_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="flowcraft"):
        store = RedisCoordinationStore(url="redis://user:s3cret@127.0.0.1:6390/0")
    assert "s3cret" not in repr(store)
    assert "s3cret" not in caplog.text
    assert caplog.records, "construction is logged (without the URL)"


def test_exactly_one_of_client_or_url() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RedisCoordinationStore()
    client = redis_asyncio.Redis()
    with pytest.raises(ValueError, match="exactly one"):
        RedisCoordinationStore(client, url="redis://127.0.0.1:6390/0")
    with pytest.raises(ValueError, match="only with url"):
        RedisCoordinationStore(client, socket_timeout=3)
