"""The queue primitives against Azurite: receive never hands out more than asked,
a renewal really keeps a message invisible (and the delete after it uses the new
pop receipt), a release really delays, a dead letter keeps its reason."""

from __future__ import annotations

import asyncio
import time

from flowcraft import RuntimeOptions
from flowcraft_azure import AzureAdapter

from .conftest import Namespace


def _adapter(namespace: Namespace, **overrides: object) -> AzureAdapter:
    return namespace.adapter(RuntimeOptions(), **overrides)


async def _receive_all(adapter: AzureAdapter, n: int = 32) -> list[str]:
    return [m.body for m in await adapter.queue.receive(n, 30)]


async def test_receive_never_returns_more_than_asked(namespace: Namespace) -> None:
    adapter = _adapter(namespace, poll_window=0.3)
    for i in range(12):
        await adapter.enqueue_raw(f"m{i}".encode())
    got = await adapter.receive(3)
    assert len(got) == 3
    assert adapter.queue.requests["receive"] == 1, "one request for one receive"
    rest = await adapter.receive(32)
    assert len(rest) == 9
    assert await adapter.receive(5) == []
    assert sorted(m.body for m in [*got, *rest]) == sorted(f"m{i}" for i in range(12))


async def test_an_empty_receive_polls_with_backoff_then_returns(namespace: Namespace) -> None:
    adapter = _adapter(namespace, poll_interval=0.05, max_poll_interval=0.2, poll_window=1.0)
    started = time.monotonic()
    assert await adapter.receive(4) == []
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0
    polls = adapter.queue.requests["receive"]
    assert 4 <= polls <= 12, polls  # 0.05, 0.1, 0.2, 0.2, ...: not a busy loop
    await adapter.enqueue_raw(b"late")
    assert [m.body for m in await adapter.receive(4)] == ["late"]


async def test_renew_keeps_a_long_job_invisible(namespace: Namespace) -> None:
    adapter = _adapter(namespace, visibility_seconds=2.0)
    await adapter.enqueue_raw(b"long job")
    (message,) = await adapter.receive(1)
    first_receipt = message.pop_receipt
    for _ in range(3):  # 3 s in all, past the 2 s visibility
        await asyncio.sleep(1.0)
        await adapter.renew(message, 2.0)
        assert await _receive_all(adapter) == [], "redelivered while renewed"
    assert message.pop_receipt != first_receipt, "each renewal hands out a new receipt"
    await adapter.ack([message])
    await asyncio.sleep(2.5)
    assert await _receive_all(adapter) == [], "the delete with the newest receipt took"


async def test_without_renewal_the_message_comes_back(namespace: Namespace) -> None:
    adapter = _adapter(namespace, visibility_seconds=1.0)
    await adapter.enqueue_raw(b"lapsed")
    (message,) = await adapter.receive(1)
    await asyncio.sleep(1.6)
    (again,) = await adapter.receive(1)
    assert again.body == "lapsed"
    assert adapter.delivery_count(again) == 2
    await adapter.ack([message])  # a stale receipt: nothing happens
    await adapter.release(message, 0)
    assert await _receive_all(adapter) == [], "the stale holder changed nothing"
    await adapter.ack([again])


async def test_release_delays_the_next_delivery(namespace: Namespace) -> None:
    adapter = _adapter(namespace)
    await adapter.enqueue_raw(b"later")
    (message,) = await adapter.receive(1)
    released = time.monotonic()
    await adapter.release(message, 2.0)
    assert await _receive_all(adapter) == []
    await asyncio.sleep(1.0)
    assert await _receive_all(adapter) == [], "released early"
    while not (found := await adapter.queue.receive(1, 30)):
        assert time.monotonic() - released < 5.0, "never came back"
        await asyncio.sleep(0.2)
    assert time.monotonic() - released >= 2.0
    assert found[0].body == "later"
    assert found[0].dequeue_count == 2


async def test_release_zero_is_at_once(namespace: Namespace) -> None:
    adapter = _adapter(namespace)
    await adapter.enqueue_raw(b"now")
    (message,) = await adapter.receive(1)
    await adapter.release(message, 0.0)
    assert await _receive_all(adapter) == ["now"]


async def test_dead_letter_keeps_body_and_reason(namespace: Namespace) -> None:
    adapter = _adapter(namespace, poll_window=0.2)
    body = '{"runId": "r", "blueprintId": "b", "nodeId": "🚀 <xml & \\" \'>"}'
    await adapter.enqueue_raw(body.encode())
    (message,) = await adapter.receive(1)
    await adapter.dead_letter(message, "UnknownBlueprintError: no blueprint 'b' <&>")
    (letter,) = await adapter.dead_letters()
    assert letter.body == body
    assert letter.reason == "UnknownBlueprintError: no blueprint 'b' <&>"
    assert letter.id == message.id
    assert await adapter.receive(1) == [], "removed from the job queue"


async def test_a_dead_letter_of_a_full_size_body_still_fits(namespace: Namespace) -> None:
    adapter = _adapter(namespace)
    body = "é" * 30_000  # 60 KB of UTF-8; escaped in the poison record it would not fit
    await adapter.enqueue_raw(body.encode())
    (message,) = await adapter.receive(1)
    await adapter.dead_letter(message, "reason " * 2000)
    (letter,) = await adapter.dead_letters()
    assert letter.reason.startswith("reason")
    assert body.startswith(letter.body)
    assert letter.body


async def test_hand_backs_near_max_deliveries_are_resent(namespace: Namespace) -> None:
    """The dequeue count includes hand-backs: near ``max_deliveries`` the loop's
    hand-back sends a fresh copy, so a job handed back often is never parked."""
    adapter = _adapter(namespace, max_deliveries=4, poll_window=0.3)
    await adapter.enqueue_raw(b"busy elsewhere")
    counts = []
    for _ in range(10):
        (message,) = await adapter.receive(1)
        counts.append(message.dequeue_count)
        await adapter._hand_back(message, adapter.delivery_count(message), 0)
    assert max(counts) <= 4, counts
    assert await _receive_all(adapter) == ["busy elsewhere"]
    assert await adapter.dead_letters() == []
