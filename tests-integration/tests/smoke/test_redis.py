"""Redis smoke test: a MULTI/EXEC transaction, and restart() keeping data and port."""

from __future__ import annotations

import uuid

import pytest
import redis

from flowcraft_backends import RestartUnsupported, RunningService


def test_multi_exec_transaction_applies_all_commands(redis_service: RunningService) -> None:
    client = redis.Redis.from_url(redis_service.url)
    key = f"smoke:{uuid.uuid4().hex}"
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"a": "1", "b": "2"})
            pipe.hincrby(key, "a", 41)
            pipe.hgetall(key)
            results = pipe.execute()
        assert results[1] == 42
        assert results[2] == {b"a": b"42", b"b": b"2"}
    finally:
        client.delete(key)
        client.close()


def test_watched_key_change_aborts_transaction(redis_service: RunningService) -> None:
    client = redis.Redis.from_url(redis_service.url)
    other = redis.Redis.from_url(redis_service.url)
    key = f"smoke:{uuid.uuid4().hex}"
    try:
        client.set(key, "0")
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            other.set(key, "changed")
            pipe.multi()
            pipe.set(key, "mine")
            with pytest.raises(redis.WatchError):
                pipe.execute()
        assert client.get(key) == b"changed"
    finally:
        client.delete(key)
        client.close()
        other.close()


def test_restart_keeps_port_and_data(redis_service: RunningService) -> None:
    if redis_service.how != "local":
        with pytest.raises(RestartUnsupported):
            redis_service.restart()
        return
    key = f"smoke:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_service.url)
    client.set(key, "survives")
    client.close()
    url_before = redis_service.url

    redis_service.restart()

    assert redis_service.url == url_before
    client = redis.Redis.from_url(redis_service.url)
    try:
        assert client.get(key) == b"survives"
    finally:
        client.delete(key)
        client.close()
