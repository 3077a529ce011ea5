"""The adapter's Redis client: concurrent commands batched on one connection, replies
shaped exactly as a plain redis-py client shapes them, and commands packed by hiredis
byte for byte as redis-py packs them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError, ResponseError

from flowcraft_bullmq import _packing as packing
from flowcraft_bullmq._packing import with_c_packing
from flowcraft_bullmq._settings import make_client


@pytest.fixture
async def clients(redis_url: str, prefix: str) -> AsyncIterator[tuple[Any, Any]]:
    batched = make_client(redis_url, {}, max_connections=4)
    plain = redis_asyncio.Redis.from_url(redis_url)
    yield batched, plain
    await batched.aclose()
    await plain.aclose()


def commands(prefix: str) -> list[tuple[str, Any]]:
    """(name, call) pairs covering reply callbacks with and without options."""
    k = f"{prefix}wire:"
    return [
        ("set", lambda c: c.set(f"{k}s", "v", nx=True)),
        ("get", lambda c: c.get(f"{k}s")),
        ("incr", lambda c: c.incr(f"{k}n")),
        ("hset", lambda c: c.hset(f"{k}h", mapping={"a": "1", "b": "é"})),
        ("hgetall", lambda c: c.hgetall(f"{k}h")),
        ("hmget", lambda c: c.hmget(f"{k}h", ["a", "missing", "b"])),
        ("zadd", lambda c: c.zadd(f"{k}z", {"x": 1.5, "y": 2})),
        ("zrange", lambda c: c.zrange(f"{k}z", 0, -1, withscores=True)),
        ("exists", lambda c: c.exists(f"{k}s", f"{k}none")),
        ("pexpire", lambda c: c.pexpire(f"{k}s", 60_000)),
        ("eval", lambda c: c.eval("return {1, 'two', ARGV[1]}", 0, 3.25)),
        ("mget", lambda c: c.mget([f"{k}s", f"{k}none"])),
    ]


async def test_concurrent_commands_get_the_replies_a_plain_client_gets(
    clients: tuple[Any, Any], prefix: str, redis_url: str
) -> None:
    batched, plain = clients
    got = await asyncio.gather(*(call(batched) for _, call in commands(prefix)))
    await plain.delete(*[k async for k in plain.scan_iter(match=f"{prefix}wire:*")])
    expected = [await call(plain) for _, call in commands(prefix)]
    for (name, _), mine, theirs in zip(commands(prefix), got, expected, strict=True):
        assert mine == theirs, name
    assert dict(zip([n for n, _ in commands(prefix)], got, strict=True))["zrange"] == [
        (b"x", 1.5),
        (b"y", 2.0),
    ]


async def test_an_error_reply_fails_only_its_own_caller(
    clients: tuple[Any, Any], prefix: str
) -> None:
    batched, _ = clients
    await batched.set(f"{prefix}text", "not a number")
    results = await asyncio.gather(
        batched.incr(f"{prefix}count"),
        batched.incr(f"{prefix}text"),
        batched.get(f"{prefix}text"),
        return_exceptions=True,
    )
    assert results[0] == 1
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"not a number"


async def test_many_concurrent_commands_all_answered_in_order(
    clients: tuple[Any, Any], prefix: str
) -> None:
    batched, _ = clients
    values = await asyncio.gather(*(batched.incr(f"{prefix}seq") for _ in range(1000)))
    assert sorted(values) == list(range(1, 1001))
    echoed = await asyncio.gather(*(batched.echo(f"m{i}") for i in range(600)))
    assert echoed == [f"m{i}".encode() for i in range(600)]


ARGS: list[tuple[Any, ...]] = [
    ("SET", "k", "v"),
    ("SET", "k", 1.5),
    ("SET", "k", 0.1),
    ("SET", "k", 12345678901234567890),
    ("SET", "k", -7),
    ("SET", "clé", "é 中文 🚀"),
    ("SET", b"k", b"\x00\xff"),
    ("CLIENT SETNAME", "x"),
    (b"CONFIG GET", "maxmemory"),
    ("SET", "k", memoryview(b"ab")),
    ("SET", "k", bytearray(b"ab")),
    ("SET", "k", "x" * 100_000),
]


def _arg_id(args: tuple[Any, ...]) -> str:
    """Stable ids: a memoryview's repr holds its address (it differed per collection)."""
    return repr(tuple(bytes(a) if isinstance(a, memoryview) else a for a in args))[:40]


@pytest.mark.parametrize("args", ARGS, ids=_arg_id)
def test_c_packing_writes_the_bytes_redis_py_writes(args: tuple[Any, ...]) -> None:
    python = Connection()
    fast = with_c_packing(Connection)()
    try:
        expected = b"".join(bytes(part) for part in python.pack_command(*args))
    except DataError:  # redis-py before 8 refuses a bytearray: then the C path must too
        with pytest.raises(DataError):
            fast.pack_command(*args)
        return
    assert b"".join(fast.pack_command(*args)) == expected


@pytest.mark.parametrize("bad", [None, True, object()])
def test_c_packing_refuses_what_redis_py_refuses(bad: Any) -> None:
    with pytest.raises(DataError):
        with_c_packing(Connection)().pack_command("SET", "k", bad)


def test_c_packing_keeps_a_non_utf8_encoder_on_the_python_packer() -> None:
    fast = with_c_packing(Connection)(encoding="latin-1")
    assert (
        b"".join(fast.pack_command("SET", "k", "é"))
        == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"
    )


def test_every_connection_kind_gets_one_c_packing_class() -> None:
    for cls in (Connection, SSLConnection, UnixDomainSocketConnection):
        made = with_c_packing(cls)
        assert issubclass(made, cls)
        assert with_c_packing(cls) is made
        assert with_c_packing(made) is made


def test_without_hiredis_connections_keep_the_python_packer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packing, "hiredis", None)
    assert with_c_packing(UnixDomainSocketConnection) is UnixDomainSocketConnection
