"""Miniflare smoke tests: the test worker's Durable Object, KV and queue, over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from flowcraft_backends import RestartUnsupported, RunningService


@pytest.fixture
async def http(miniflare_service: RunningService) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(
        base_url=miniflare_service.url, timeout=30.0, limits=limits
    ) as client:
        yield client


def _key() -> str:
    return f"smoke-{uuid.uuid4().hex}"


async def _incr(http: httpx.AsyncClient, key: str) -> int:
    answer = await http.post("/incr", params={"key": key})
    answer.raise_for_status()
    value: int = answer.json()["value"]
    return value


async def test_durable_object_increment(http: httpx.AsyncClient) -> None:
    key = _key()
    assert [await _incr(http, key) for _ in range(3)] == [1, 2, 3]
    answer = await http.get("/get", params={"key": key})
    assert answer.json() == {"key": key, "value": 3}


async def test_200_concurrent_increments_give_exactly_200(http: httpx.AsyncClient) -> None:
    key = _key()
    values = await asyncio.gather(*(_incr(http, key) for _ in range(200)))
    # Each increment saw a distinct value: none was lost or applied twice.
    assert sorted(values) == list(range(1, 201))
    answer = await http.get("/get", params={"key": key})
    assert answer.json()["value"] == 200


async def test_concurrent_setnx_has_exactly_one_winner(http: httpx.AsyncClient) -> None:
    key = _key()
    answers = await asyncio.gather(
        *(http.post("/setnx", params={"key": key}, content=f"owner-{i}") for i in range(50))
    )
    bodies = [answer.json() for answer in answers]
    winners = [body["value"] for body in bodies if body["set"]]
    assert len(winners) == 1
    assert {body["value"] for body in bodies} == {winners[0]}


async def test_kv_put_and_get(http: httpx.AsyncClient) -> None:
    key = _key()
    assert (await http.get("/kv", params={"key": key})).json()["value"] is None
    put = await http.put("/kv", params={"key": key, "ttl": "120"}, content="done")
    put.raise_for_status()
    assert (await http.get("/kv", params={"key": key})).json()["value"] == "done"


async def test_queue_message_reaches_the_consumer(http: httpx.AsyncClient) -> None:
    body = _key()
    (await http.post("/queue/send", content=body)).raise_for_status()
    # The consumer batches for up to 1 s, then records the message in KV.
    for _ in range(100):
        record = await http.get("/kv", params={"key": f"received:{body}"})
        if record.json()["value"] is not None:
            break
        await asyncio.sleep(0.1)
    assert record.json()["value"] == "1"  # delivered on the first attempt


async def test_restart_keeps_port_and_durable_object_state(
    miniflare_service: RunningService, http: httpx.AsyncClient
) -> None:
    if miniflare_service.how != "local":
        with pytest.raises(RestartUnsupported):
            miniflare_service.restart()
        return
    key = _key()
    await _incr(http, key)
    await _incr(http, key)
    url_before = miniflare_service.url

    miniflare_service.restart()

    assert miniflare_service.url == url_before
    async with httpx.AsyncClient(base_url=miniflare_service.url, timeout=30.0) as fresh:
        assert await _incr(fresh, key) == 3
