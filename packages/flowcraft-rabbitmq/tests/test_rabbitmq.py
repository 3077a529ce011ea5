"""What the RabbitMQ adapter adds to the kit: delay queues, dead letters, prefetch,
graceful stop, the reconciler, result repair, re-declaring a lost queue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.distributed.payload import JobPayload
from flowcraft_rabbitmq import RabbitMQAdapter
from flowcraft_rabbitmq._settings import HEADER_ERROR

from .conftest import Namespace

TIMEOUT = 30.0


def options(*flows: Flow) -> RuntimeOptions:
    return RuntimeOptions.from_flows(*flows)


async def until(check: Callable[[], Awaitable[Any]], what: str) -> Any:
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                found = await check()
                if found:
                    return found
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def run_worker(adapter: RabbitMQAdapter) -> asyncio.Task[None]:
    return asyncio.ensure_future(adapter.worker())


async def peek(namespace: Namespace, queue_name: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The messages ready in a queue, left in it (read unacked, then the channel closes)."""
    connection = await aio_pika.connect(namespace.backends.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(queue_name)
        found = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            found.append(message)
        return found
    finally:
        await connection.close()


async def test_queue_retry_waits_in_a_delay_queue_with_a_per_message_ttl(
    namespace: Namespace,
) -> None:
    """A failed attempt goes to the delay queue of its backoff (per-message TTL), and the
    work queue is left empty meanwhile."""
    attempts: list[int] = []

    def fails(ctx: NodeContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("down")

    flow = Flow("slow-retry").node("a", fails, max_retries=3, retry_delay=40_000)
    worker = namespace.adapter(options(flow), retry_mode="queue")
    task = run_worker(worker)
    try:
        run = await worker.start_run("slow-retry")
        delay_queue = worker.broker.topology.delay_queue(60_000)

        async def delayed() -> int:
            return (await worker.broker.depths())[delay_queue]

        await until(delayed, "the job in the 60 s delay queue")
        (message,) = await peek(namespace, delay_queue)
        assert message.expiration == 60.0
        assert JobPayload.decode(message.body).run_id == run
        depths = await worker.broker.depths()
        assert depths[worker.broker.topology.queue] == 0
        assert attempts == [1]
        assert (await worker.get_status(run)).status == "running"
    finally:
        await worker.stop()
        await task


async def test_queue_retry_comes_back_through_dead_lettering(namespace: Namespace) -> None:
    """With a short backoff the message expires from the delay queue back to the work
    queue (RabbitMQ dead-letters it, adding x-death) and the next attempt succeeds."""
    attempts: list[int] = []
    seen_deaths: list[Any] = []

    def flaky(ctx: NodeContext) -> str:
        attempts.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return "ok"

    flow = Flow("fast-retry").node("a", flaky, max_retries=3, retry_delay=50, retry_backoff="fixed")
    worker = namespace.adapter(options(flow), retry_mode="queue")
    deliver = worker._deliver

    async def spy(handler: Any, message: Any) -> None:
        seen_deaths.append((message.headers or {}).get("x-death"))
        await deliver(handler, message)

    worker._deliver = spy  # type: ignore[method-assign]
    task = run_worker(worker)
    try:
        run = await worker.start_run("fast-retry")
        result = await worker.wait_for_result(run, TIMEOUT)
        assert result.status == "completed", result.errors
        assert attempts == [1, 2, 3]
        assert seen_deaths[0] is None
        reasons = [d[0]["reason"] for d in seen_deaths[1:]]
        assert reasons == ["expired", "expired"]
        queues = {d[0]["queue"] for d in seen_deaths[1:]}
        assert queues == {worker.broker.topology.delay_queue(100)}
    finally:
        await worker.stop()
        await task


async def test_dead_letters_keep_the_body_and_say_why(namespace: Namespace) -> None:
    flow = Flow("ok").node("a", lambda c: 1)
    worker = namespace.adapter(options(flow))
    task = run_worker(worker)
    try:
        await worker.broker.publish(b"\x00garbage\xff")
        ghost = JobPayload(run_id="ghost", blueprint_id="missing", node_id="a")
        await worker.enqueue_job(ghost)
        letters = await until(lambda: _at_least(worker.dead_letters(), 2), "two dead letters")
        by_body = {letter.body: letter for letter in letters}
        assert "PayloadDecodeError" in by_body[b"\x00garbage\xff"].reason
        assert "missing" in by_body[ghost.encode()].reason
        assert by_body[ghost.encode()].attributes[HEADER_ERROR] == by_body[ghost.encode()].reason
        assert len(await worker.dead_letters()) == 2, "peeking removed letters"
        assert len(await worker.dead_letters(remove=True)) == 2
        assert await worker.dead_letters() == []
    finally:
        await worker.stop()
        await task


async def _at_least(letters: Awaitable[list[Any]], n: int) -> list[Any] | None:
    found = await letters
    return found if len(found) >= n else None


async def test_redeliveries_are_exhausted_into_the_dead_letter_queue(
    namespace: Namespace,
) -> None:
    """A job handed back again and again (here: a version no worker has) is
    dead-lettered after ``max_redeliveries``, with the reason."""
    v1 = Flow("versioned", version="1").node("a", lambda c: 1)
    v2 = Flow("versioned", version="2").node("a", lambda c: 2)
    client = namespace.adapter(options(v1))
    worker = namespace.adapter(options(v2), max_redeliveries=2, retry_delay_seconds=0.05)
    task = run_worker(worker)
    try:
        run = await client.start_run("versioned")
        (letter,) = await until(lambda: worker.dead_letters(), "the exhausted job")
        assert "exhausted after 2 redeliveries" in letter.reason
        assert "VersionMismatchError" in letter.reason
        assert JobPayload.decode(letter.body).run_id == run
        assert (await client.get_status(run)).status == "running"
    finally:
        await worker.stop()
        await task


async def test_prefetch_is_the_concurrency(namespace: Namespace) -> None:
    release = asyncio.Event()
    running = 0
    most = 0

    async def held(ctx: NodeContext) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return 1

    flow = Flow("held").node("a", held)
    worker = namespace.adapter(options(flow), concurrency=3)
    task = run_worker(worker)
    try:
        runs = [await worker.start_run("held") for _ in range(8)]

        async def three_running() -> bool:
            return running == 3

        await until(three_running, "three jobs in hand")
        await asyncio.sleep(0.3)  # give a fourth delivery every chance to arrive
        assert most == 3
        release.set()
        for run in runs:
            assert (await worker.wait_for_result(run, TIMEOUT)).status == "completed"
        assert most == 3
    finally:
        release.set()
        await worker.stop()
        await task


async def test_prefetch_ahead_of_the_concurrency(namespace: Namespace) -> None:
    """prefetch 4, concurrency 2: four messages leave the queue, two jobs run at once,
    and the two not started go back to the queue when the worker stops."""
    release = asyncio.Event()
    running = 0
    most = 0

    async def held(ctx: NodeContext) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return 1

    flow = Flow("ahead").node("a", held)
    worker = namespace.adapter(options(flow), concurrency=2, prefetch=4)
    queue = worker.broker.topology.queue
    task = run_worker(worker)
    try:
        runs = [await worker.start_run("ahead") for _ in range(8)]

        async def four_taken() -> bool:
            return running == 2 and (await worker.broker.depths())[queue] == 4

        await until(four_taken, "two jobs running and four messages taken")
        await asyncio.sleep(0.3)  # a third job, if any, has started
        assert most == 2
        await worker.stop()
        release.set()
        await asyncio.wait_for(task, TIMEOUT)

        async def requeued() -> bool:
            return (await worker.broker.depths())[queue] == 6

        await until(requeued, "the two prefetched jobs back in the queue")
    finally:
        release.set()
        await worker.stop()
        await task
    second = namespace.adapter(options(flow), concurrency=2, prefetch=4)
    second_task = run_worker(second)
    try:
        for run in runs:
            assert (await second.wait_for_result(run, TIMEOUT)).status == "completed"
        assert most == 2
    finally:
        await second.stop()
        await second_task


async def test_stop_finishes_the_jobs_in_hand(namespace: Namespace) -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    calls: list[str] = []

    async def held(ctx: NodeContext) -> str:
        calls.append(ctx.idempotency_key)
        started.set()
        await release.wait()
        return "done"

    flow = Flow("graceful").node("a", held).node("b", lambda c: c.input).chain("a", "b")
    worker = namespace.adapter(options(flow))
    task = run_worker(worker)
    run = await worker.start_run("graceful")
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await worker.stop()
    await asyncio.sleep(0.2)
    assert not task.done(), "stop() abandoned a job in hand"
    release.set()
    await asyncio.wait_for(task, TIMEOUT)
    assert await worker.create_context(run).get("_outputs.a") == "done"
    # The job was acked: a new worker runs only b, never a again.
    second = namespace.adapter(options(flow))
    second_task = run_worker(second)
    try:
        result = await second.wait_for_result(run, TIMEOUT)
        assert result.status == "completed"
        assert calls == [f"{run}:a:1"]
    finally:
        await second.stop()
        await second_task


async def test_reconcile_stalled_finds_a_run_that_lost_its_job(namespace: Namespace) -> None:
    flow = Flow("stall").node("a", lambda c: 1).node("b", lambda c: c.input + 1).chain("a", "b")
    worker = namespace.adapter(options(flow))
    lost: list[JobPayload] = []
    enqueue = worker.enqueue_job

    async def lossy(job: JobPayload) -> None:
        if job.node_id == "b" and not lost:
            lost.append(job)
            return
        await enqueue(job)

    worker.enqueue_job = lossy  # type: ignore[method-assign]
    task = run_worker(worker)
    try:
        run = await worker.start_run("stall")
        await until(lambda: _is_true(bool(lost)), "the job of b to be lost")
        await until(lambda: worker.create_context(run).has("_outputs.a"), "a to commit")
        assert await worker.reconcile_stalled(older_than_seconds=3600) == {}
        await asyncio.sleep(2.1)  # no progress for longer than the period (2 s)
        assert await worker.reconcile_stalled(older_than_seconds=2) == {run: 1}
        assert await worker.reconcile_stalled(older_than_seconds=2) == {}, "claimed twice"
        result = await worker.wait_for_result(run, TIMEOUT)
        assert result.status == "completed"
    finally:
        await worker.stop()
        await task


async def _is_true(value: bool) -> bool:
    return value


async def test_background_reconciler_redrives_a_stalled_run(namespace: Namespace) -> None:
    flow = Flow("bg").node("a", lambda c: 1).node("b", lambda c: c.input + 1).chain("a", "b")
    worker = namespace.adapter(
        options(flow), reconcile_interval_seconds=0.2, stalled_after_seconds=0.3
    )
    dropped: list[JobPayload] = []
    enqueue = worker.enqueue_job

    async def lossy(job: JobPayload) -> None:
        if job.node_id == "b" and not dropped:
            dropped.append(job)
            return
        await enqueue(job)

    worker.enqueue_job = lossy  # type: ignore[method-assign]
    task = run_worker(worker)
    try:
        run = await worker.start_run("bg")
        result = await worker.wait_for_result(run, TIMEOUT)
        assert result.status == "completed"
        assert dropped, "the job was never lost"
    finally:
        await worker.stop()
        await task


async def test_a_final_run_without_a_result_row_still_answers(namespace: Namespace) -> None:
    """If the run's context says final but the row has no result (emptied by hand),
    wait_for_result falls back to reading the state."""
    flow = Flow("repair").node("a", lambda c: "out")
    worker = namespace.adapter(options(flow))
    task = run_worker(worker)
    try:
        run = await worker.start_run("repair")
        expected = await worker.wait_for_result(run, TIMEOUT)
    finally:
        await worker.stop()
        await task
    pool = await worker.store.pool()
    await pool.execute(f"UPDATE {worker.store.names.runs} SET result = NULL WHERE run_id = $1", run)
    assert (await worker.store.result(run))[0] is None
    assert (await worker.wait_for_result(run, TIMEOUT)).to_json_dict() == expected.to_json_dict()


async def test_a_deleted_work_queue_is_declared_again(namespace: Namespace) -> None:
    """Publishes are mandatory: an unroutable job is not dropped silently; the adapter
    declares its queues again and publishes."""
    flow = Flow("redeclare").node("a", lambda c: 1)
    client = namespace.adapter(options(flow))
    await client.connect()
    connection = await aio_pika.connect(namespace.backends.amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete(client.broker.topology.queue)
    finally:
        await connection.close()
    run = await client.start_run("redeclare")
    worker = namespace.adapter(options(flow))
    task = run_worker(worker)
    try:
        assert (await worker.wait_for_result(run, TIMEOUT)).status == "completed"
    finally:
        await worker.stop()
        await task


async def test_wait_for_result_is_woken_by_the_publication(namespace: Namespace) -> None:
    """The waiter polls every 30 s here; PostgreSQL's NOTIFY wakes it long before."""
    release = asyncio.Event()

    async def held(ctx: NodeContext) -> str:
        await release.wait()
        return "done"

    flow = Flow("notify").node("a", held)
    client = namespace.adapter(options(flow))
    worker = namespace.adapter(options(flow))
    task = run_worker(worker)
    try:
        run = await client.start_run("notify")
        waiter = asyncio.ensure_future(client.wait_for_result(run, 60, poll_interval=30))
        await until(lambda: _is_true(client.store.notifications.listening), "the LISTEN")
        await asyncio.sleep(0.1)  # the waiter's first look is done; it sleeps now
        release.set()
        result = await asyncio.wait_for(waiter, 15)
        assert result.status == "completed"
        assert result.context["_outputs.a"] == "done"
    finally:
        release.set()
        await worker.stop()
        await task
