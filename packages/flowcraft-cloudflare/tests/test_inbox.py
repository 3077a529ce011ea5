"""The inbox primitives against Miniflare: the Cloudflare Queue hop, visibility leases,
renewal, release with a delay, dead letters with their reason, the Worker's secret."""

from __future__ import annotations

import asyncio
import time

import pytest

from flowcraft.context import PatchOperation
from flowcraft_cloudflare import (
    MAX_MESSAGE_BYTES,
    DurableObjectContext,
    Inbox,
    InboxMessage,
    WorkerAuthError,
    WorkerClient,
    WorkerError,
    WorkerSettings,
    run_object,
)


async def pull_all(inbox: Inbox, want: int, *, visibility: float = 30) -> list[InboxMessage]:
    """Pull until ``want`` messages arrived (the queue consumer files them in batches)."""
    got: list[InboxMessage] = []
    deadline = time.monotonic() + 15
    while len(got) < want and time.monotonic() < deadline:
        got += await inbox.pull(want - len(got), visibility_seconds=visibility, wait_seconds=1)
    return got


async def test_messages_pass_through_the_cloudflare_queue(inbox: Inbox) -> None:
    bodies = [f"job {i} 🚀 \x00" for i in range(30)]
    await inbox.send(bodies)
    got = await pull_all(inbox, 30)
    assert sorted(m.body for m in got) == sorted(bodies)
    assert {m.attempts for m in got} == {1}
    assert await inbox.ack(got) == 30
    stats = await inbox.stats()
    assert (stats.ready, stats.hidden, stats.dead) == (0, 0, 0)


async def test_direct_sends_skip_the_queue(client: WorkerClient, namespace: str) -> None:
    inbox = Inbox(client, f"{namespace}-direct", direct=True)
    await inbox.send(["a", "b"])
    got = await inbox.pull(10, visibility_seconds=30)
    assert sorted(m.body for m in got) == ["a", "b"]


async def test_pull_never_returns_more_than_asked(inbox: Inbox) -> None:
    await inbox.send([str(i) for i in range(12)])
    await asyncio.sleep(0.5)
    first = await inbox.pull(5, visibility_seconds=30, wait_seconds=2)
    assert 1 <= len(first) <= 5
    rest = await pull_all(inbox, 12 - len(first))
    assert len(first) + len(rest) == 12
    assert len({m.id for m in first + rest}) == 12


async def test_pull_waits_for_a_message(inbox: Inbox) -> None:
    started = time.monotonic()
    assert await inbox.pull(1, visibility_seconds=30, wait_seconds=0.5) == []
    assert time.monotonic() - started >= 0.4
    sender = asyncio.ensure_future(_send_later(inbox, "late", 0.3))
    got = await inbox.pull(1, visibility_seconds=30, wait_seconds=10)
    await sender
    assert [m.body for m in got] == ["late"]


async def _send_later(inbox: Inbox, body: str, delay: float) -> None:
    await asyncio.sleep(delay)
    await inbox.send([body])


async def test_a_pulled_message_is_invisible_until_its_visibility_ends(inbox: Inbox) -> None:
    await inbox.send(["x"])
    (message,) = await pull_all(inbox, 1, visibility=1.0)
    assert await inbox.pull(1, visibility_seconds=1, wait_seconds=0.3) == []
    (again,) = await inbox.pull(1, visibility_seconds=30, wait_seconds=3)
    assert again.id == message.id
    assert again.attempts == 2
    assert again.lease != message.lease
    # The first lease is lost: it can neither ack nor renew the message any more.
    assert await inbox.ack([message]) == 0
    assert await inbox.extend([message], 30) == [False]
    assert await inbox.ack([again]) == 1


async def test_renewal_keeps_a_long_job_invisible(inbox: Inbox) -> None:
    await inbox.send(["long"])
    (message,) = await pull_all(inbox, 1, visibility=1.0)
    for _ in range(4):  # 2 s in all, twice the visibility timeout
        await asyncio.sleep(0.5)
        assert await inbox.extend([message], 1.0) == [True]
        assert await inbox.pull(1, visibility_seconds=30) == []
    assert await inbox.ack([message]) == 1
    await asyncio.sleep(1.2)
    assert await inbox.pull(1, visibility_seconds=30) == []


async def test_release_delays_and_refunds(inbox: Inbox) -> None:
    await inbox.send(["r"])
    (message,) = await pull_all(inbox, 1)
    assert await inbox.release([message], 1.0) == 1
    started = time.monotonic()
    assert await inbox.pull(1, visibility_seconds=30, wait_seconds=0.5) == []
    (again,) = await inbox.pull(1, visibility_seconds=30, wait_seconds=5)
    assert time.monotonic() - started >= 0.9
    assert again.attempts == 1  # a hand-back gives its delivery back
    assert await inbox.release([again], 0, counted=True) == 1
    (third,) = await inbox.pull(1, visibility_seconds=30, wait_seconds=2)
    assert third.attempts == 2
    assert await inbox.release([message], 0) == 0  # a lost lease releases nothing


async def test_release_delay_is_clamped_to_twelve_hours(inbox: Inbox) -> None:
    await inbox.send(["far"])
    (message,) = await pull_all(inbox, 1)
    assert await inbox.release([message], 10**9) == 1
    assert (await inbox.stats()).hidden == 1


async def test_dead_letters_keep_the_reason(inbox: Inbox) -> None:
    await inbox.send(["poison"])
    (message,) = await pull_all(inbox, 1)
    assert await inbox.dead_letter(message, "PayloadDecodeError: not JSON ✗")
    (letter,) = await inbox.dead_letters()
    assert (letter.body, letter.error, letter.attempts) == (
        "poison",
        "PayloadDecodeError: not JSON ✗",
        1,
    )
    assert await inbox.pull(1, visibility_seconds=30, wait_seconds=0.3) == []
    stats = await inbox.stats()
    assert (stats.ready, stats.hidden, stats.dead) == (0, 0, 1)


async def test_dead_letters_are_requeued_and_purged(inbox: Inbox) -> None:
    """Requeue moves the oldest letters back among the messages (new ids, one atomic
    step); purge deletes by ids, by count, or all."""
    await inbox.send(["a", "b", "c", "d"])
    for message in await pull_all(inbox, 4):
        assert await inbox.dead_letter(message, f"bad {message.body}")
    parked = {letter.body: letter.message_id for letter in await inbox.dead_letters()}
    assert set(parked) == {"a", "b", "c", "d"}
    assert await inbox.requeue_dead(2) == 2
    back = await inbox.pull(10, visibility_seconds=30)
    assert len(back) == 2
    assert {m.id for m in back}.isdisjoint(parked.values()), "requeued under new ids"
    assert {m.attempts for m in back} == {1}, "a requeued job starts its count again"
    left = {letter.body for letter in await inbox.dead_letters()}
    assert left == {"a", "b", "c", "d"} - {m.body for m in back}
    assert await inbox.purge_dead(ids=[parked[next(iter(left))]]) == 1
    assert await inbox.purge_dead(ids=["no-such-letter"]) == 0
    assert await inbox.purge_dead() == 1
    assert await inbox.dead_letters() == []
    assert await inbox.requeue_dead(5) == 0


async def test_a_message_over_128_kb_is_refused_before_sending(inbox: Inbox) -> None:
    with pytest.raises(WorkerError, match=r"128000"):
        await inbox.send(["x" * MAX_MESSAGE_BYTES])
    assert inbox.client.requests["enqueue"] == 0


async def test_a_big_send_is_split_into_batches_the_queue_takes(inbox: Inbox) -> None:
    """12 messages of 100 KB: one call from Python, several sendBatch calls (256 KB each
    at most) in the Worker, every message delivered."""
    bodies = [f"{i:03d}" + "x" * 100_000 for i in range(12)]
    await inbox.send(bodies)
    got = await pull_all(inbox, 12)
    assert sorted(m.body for m in got) == bodies


async def test_delayed_send(inbox: Inbox) -> None:
    await inbox.send(["later"], delay_seconds=1)
    assert await inbox.pull(1, visibility_seconds=30, wait_seconds=0.5) == []
    got = await pull_all(inbox, 1)
    assert [m.body for m in got] == ["later"]


async def test_raw_bytes_land_in_the_default_inbox(client: WorkerClient) -> None:
    default = Inbox(client, "flowcraft-jobs")
    await default.purge()
    await default.send_raw(b"\xff\xfe not json at all")
    (message,) = await pull_all(default, 1)
    assert message.body.endswith(" not json at all")
    await default.ack([message])


async def test_a_wrong_secret_is_refused(settings: WorkerSettings, namespace: str) -> None:
    for secret in ("wrong", settings.secret.get_secret_value() + "x", "a" * 10_000):
        bad = WorkerClient(WorkerSettings(url=settings.url, secret=secret))
        try:
            with pytest.raises(WorkerAuthError):
                await Inbox(bad, namespace).stats()
        finally:
            await bad.aclose()


async def test_the_run_object_is_deleted_once_everything_expired(
    client: WorkerClient, namespace: str
) -> None:
    """The alarm purges: a context whose TTL passed reads as empty afterwards."""
    ctx = DurableObjectContext(client, run_object(namespace, "short"), "short", ttl_seconds=0.5)
    await ctx.patch([PatchOperation("set", "k", 1)])
    assert await ctx.get("k") == 1
    for _ in range(40):
        if not await ctx.to_dict():
            break
        await asyncio.sleep(0.25)
    assert await ctx.to_dict() == {}
    # The object works again after its purge (its tables are made anew).
    await ctx.patch([PatchOperation("set", "k", 2)])
    assert await ctx.get("k") == 2


async def test_park_keeps_a_message_pulled_elsewhere_with_its_reason(inbox: Inbox) -> None:
    """The HTTP pull delivery's dead letters: parked in the inbox object, listed with
    the inbox's own."""
    from flowcraft_cloudflare import InboxMessage

    await inbox.park(InboxMessage("cf-1", '{"not": "a job"}', 3, "lease"), "bad payload")
    (letter,) = await inbox.dead_letters()
    assert (letter.message_id, letter.body, letter.error, letter.attempts) == (
        "cf-1",
        '{"not": "a job"}',
        "bad payload",
        3,
    )
    assert (await inbox.stats()).dead == 1
