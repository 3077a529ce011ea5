"""What is special about SQS: FIFO queues, the visibility heartbeat, deleting only after the
handler, dead letters (ours and the redrive policy's), queue retries, stopping mid-poll,
the reconciler, settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from flowcraft import Flow, RuntimeOptions
from flowcraft.distributed.payload import JobPayload
from flowcraft.events import CollectingEventBus
from flowcraft.node import NodeContext
from flowcraft_sqs import AwsClients, AwsSettings, QueueUrls, SqsAdapter, create_queues

TIMEOUT = 30.0


def _options(*flows: Flow, events: CollectingEventBus | None = None) -> RuntimeOptions:
    return RuntimeOptions.from_flows(*flows, event_bus=events)


class Fleet:
    """A client adapter and running workers on one queue, stopped at the end."""

    def __init__(self, clients: AwsClients, table: str, queue_url: str) -> None:
        self.clients = clients
        self.table = table
        self.queue_url = queue_url
        self.running: list[tuple[SqsAdapter, asyncio.Future[None]]] = []

    def adapter(self, options: RuntimeOptions, **kw: Any) -> SqsAdapter:
        settings: dict[str, Any] = {"wait_time_seconds": 1, "visibility_timeout": 10}
        return SqsAdapter(
            runtime_options=options,
            queue_url=self.queue_url,
            table_name=self.table,
            clients=self.clients,
            **(settings | kw),
        )

    def start(self, options: RuntimeOptions, workers: int = 2, **kw: Any) -> list[SqsAdapter]:
        started = []
        for _ in range(workers):
            worker = self.adapter(options, **kw)
            self.running.append((worker, asyncio.ensure_future(worker.worker())))
            started.append(worker)
        return started

    async def stop(self) -> None:
        for worker, _ in self.running:
            await worker.stop()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(task for _, task in self.running))
        self.running.clear()


@contextlib.asynccontextmanager
async def _fleet(clients: AwsClients, table: str, queue_url: str) -> AsyncIterator[Fleet]:
    fleet = Fleet(clients, table, queue_url)
    try:
        yield fleet
    finally:
        await fleet.stop()


@pytest.fixture
async def fleet(clients: AwsClients, table: str, queues: QueueUrls) -> AsyncIterator[Fleet]:
    async with _fleet(clients, table, queues.queue_url) as made:
        yield made


async def _queue_depth(clients: AwsClients, url: str) -> tuple[int, int]:
    attributes = (
        await clients.sqs_call(
            "get_queue_attributes",
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
        )
    )["Attributes"]
    return (
        int(attributes["ApproximateNumberOfMessages"]),
        int(attributes["ApproximateNumberOfMessagesNotVisible"]),
    )


async def _until(check: Callable[[], Any], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                found = check()
                if asyncio.iscoroutine(found):
                    found = await found
                if found:
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


def _diamond(width: int = 16) -> Flow:
    flow = Flow("diamond").node("start", lambda c: 1).node("end", lambda c: c.input)
    for i in range(width):
        flow.node(f"b{i}", lambda c, i=i: c.input + i).edge("start", f"b{i}").edge(f"b{i}", "end")
    return flow


# ------------------------------------------------------------------------- FIFO


async def test_fifo_queue_runs_chains_and_joins(
    clients: AwsClients, table: str, fifo_queues: QueueUrls
) -> None:
    chain = Flow("chain").node("a", lambda c: 1).node("b", lambda c: c.input + 1)
    chain.node("c", lambda c: c.input * 10).chain("a", "b", "c")
    options = _options(chain, _diamond())
    async with _fleet(clients, table, fifo_queues.queue_url) as fleet:
        fleet.start(options)
        client = fleet.adapter(options)
        assert client.fifo
        runs = [await client.start_run("chain"), await client.start_run("diamond")]
        first, second = [await client.wait_for_result(r, TIMEOUT) for r in runs]
    assert first.status == second.status == "completed"
    assert first.context["_outputs.c"] == 20
    assert second.context["_outputs.end"] == {f"b{i}": 1 + i for i in range(16)}


async def test_fifo_groups_per_run_and_deduplicates_only_retried_sends(
    clients: AwsClients, table: str, fifo_queues: QueueUrls
) -> None:
    fleet = Fleet(clients, table, fifo_queues.queue_url)
    flow = Flow("one").node("a", lambda c: 1)
    by_run = fleet.adapter(_options(flow))
    by_node = fleet.adapter(_options(flow), message_group="node")
    job = JobPayload(run_id="run-1", blueprint_id="one", node_id="a")
    await by_run.enqueue_job(job)
    await by_run.enqueue_job(job)  # a loop enqueues the same node again: never dropped
    await by_node.enqueue_job(job)
    await by_run.enqueue_job(job.model_copy(update={"run_id": "ü" * 200}))
    received = (
        await clients.sqs_call(
            "receive_message",
            QueueUrl=fifo_queues.queue_url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["MessageGroupId", "MessageDeduplicationId"],
        )
    )["Messages"]
    assert len(received) == 4
    groups = [m["Attributes"]["MessageGroupId"] for m in received]
    hashed = next(g for g in groups if not g.startswith("run-1"))
    assert sorted(groups) == sorted(["run-1", "run-1", "run-1:a", hashed])
    assert len(hashed) == 64
    assert hashed.isascii()
    dedup = {m["Attributes"]["MessageDeduplicationId"] for m in received}
    assert len(dedup) == 4
    assert {JobPayload.decode(m["Body"]) for m in received[:2]} == {job}


# ------------------------------------------------------------------------- visibility


async def test_a_long_job_keeps_its_message_invisible(fleet: Fleet) -> None:
    """A node running for more than twice the visibility timeout is not redelivered."""
    calls: list[str] = []

    async def slow(ctx: NodeContext) -> str:
        calls.append(ctx.idempotency_key)
        await asyncio.sleep(5)
        return "done"

    events = CollectingEventBus()
    options = _options(Flow("slow").node("s", slow), events=events)
    fleet.start(options, visibility_timeout=2, lease_seconds=30)
    client = fleet.adapter(options)
    result = await client.wait_for_result(await client.start_run("slow"), TIMEOUT)
    assert result.status == "completed"
    assert len(calls) == 1
    assert not [e for e in events.events if e.type in ("job:duplicate", "job:requeued")]


async def test_message_is_deleted_only_after_the_handler_returns(
    fleet: Fleet, queues: QueueUrls
) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()

    async def held(ctx: NodeContext) -> str:
        started.set()
        await gate.wait()
        return "released"

    options = _options(Flow("held").node("h", held))
    fleet.start(options, workers=1)
    client = fleet.adapter(options)
    run = await client.start_run("held")
    await asyncio.wait_for(started.wait(), TIMEOUT)
    assert await _queue_depth(fleet.clients, queues.queue_url) == (0, 1)
    gate.set()
    assert (await client.wait_for_result(run, TIMEOUT)).status == "completed"
    await _until(
        lambda: _equal(_queue_depth(fleet.clients, queues.queue_url), (0, 0)),
        "the message to be deleted",
    )


async def _equal(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# ------------------------------------------------------------------------- dead letters


async def test_state_too_large_fails_the_run_with_the_reason(fleet: Fleet) -> None:
    """A commit past the item budget commits nothing and fails the run, naming the limit."""

    async def big(ctx: NodeContext) -> str:
        await ctx.set("blob", "x" * 30_000)
        return "too big"

    options = _options(Flow("big").node("b", big))
    fleet.start(options, workers=1, max_state_bytes=20_000)
    client = fleet.adapter(options, max_state_bytes=20_000)
    run = await client.start_run("big")
    result = await client.wait_for_result(run, 60)
    assert result.status == "failed"
    assert "20,000 bytes" in result.errors[0]["message"]
    assert "blob" not in result.context
    assert await client.dead_letters() == []


async def test_redrive_parks_a_job_that_is_never_settled(clients: AwsClients, table: str) -> None:
    """A job whose worker dies on it every time (received, never settled) is moved to
    the dead-letter queue by SQS's redrive policy, with no reason of ours."""
    queues = await create_queues(clients, "bouncy", max_receive_count=2)
    async with _fleet(clients, table, queues.queue_url) as fleet:
        client = fleet.adapter(_options(Flow("v").node("a", lambda c: 1)))
        await client.send_body('{"runId":"r","blueprintId":"v","nodeId":"a"}')
        for _ in range(2):  # two workers that crash before settling it
            (message,) = await client.receive(1)
            await client.release(message, 0)
        assert await client.receive(1) == []  # the third receive moves it instead

        async def moved() -> bool:
            return bool(await client.dead_letters())

        await _until(moved, "the redrive to the dead-letter queue")
    (letter,) = await client.dead_letters()
    assert letter.reason == ""  # moved by SQS, not by the adapter


async def test_hand_backs_never_reach_the_redrive(clients: AwsClients, table: str) -> None:
    """A job no worker can take yet (version mismatch) bounces far past the redrive
    bound without being parked: near it, the worker re-sends a fresh copy."""
    queues = await create_queues(clients, "bouncy", max_receive_count=4)

    def versioned(version: str) -> Flow:
        return Flow("v", version=version).node("a", lambda c: version)

    events = CollectingEventBus()
    async with _fleet(clients, table, queues.queue_url) as fleet:
        fleet.start(_options(versioned("2"), events=events), workers=1, retry_delay_seconds=0)
        client = fleet.adapter(_options(versioned("1")))
        run = await client.start_run("v")
        await _until(lambda: events.types().count("job:requeued") >= 12, "a dozen hand-backs")
        assert await client.dead_letters() == []
        fleet.start(_options(versioned("1")), workers=1)
        result = await client.wait_for_result(run, TIMEOUT)
    assert result.status == "completed"
    assert await client.dead_letters() == []


# ------------------------------------------------------------------------- queue retries


async def test_queue_mode_counts_failed_attempts_not_receives(fleet: Fleet) -> None:
    """Each failed attempt comes back after the node's backoff and counts once; SQS's
    receive count (which hand-backs also raise) is not the attempt number."""
    seen: list[int] = []

    def flaky(ctx: NodeContext) -> str:
        seen.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return "third time"

    flow = Flow("q").node("f", flaky, max_retries=3, retry_delay=200, retry_backoff="fixed")
    options = _options(flow)
    fleet.start(options, workers=1, retry_mode="queue")
    client = fleet.adapter(options, retry_mode="queue")
    run = await client.start_run("q")
    result = await client.wait_for_result(run, TIMEOUT)
    assert result.status == "completed", result.errors
    assert seen == [1, 2, 3]


# ------------------------------------------------------------------------- stopping


async def test_stop_does_not_wait_out_a_long_poll_and_loses_no_message(
    clients: AwsClients, table: str, queues: QueueUrls
) -> None:
    options = _options(Flow("after").node("a", lambda c: "ok"))
    fleet = Fleet(clients, table, queues.queue_url)
    (polling,) = fleet.start(options, workers=1, wait_time_seconds=20, visibility_timeout=60)
    await asyncio.sleep(0.5)  # the worker is inside its 20 s long poll
    await fleet.stop()
    # The abandoned poll may still take this job: it must hand it straight back, not
    # hide it for the 60 s visibility timeout.
    client = fleet.adapter(options)
    run = await client.start_run("after")
    async with _fleet(clients, table, queues.queue_url) as second:
        second.start(options, workers=1)
        result = await client.wait_for_result(run, TIMEOUT)
    assert result.status == "completed"
    assert polling.stopping


# ------------------------------------------------------------------------- reconciler


async def test_reconciler_finds_stalled_runs_and_redrives_them(fleet: Fleet) -> None:
    chain = Flow("lost").node("a", lambda c: 1).node("b", lambda c: c.input + 1).chain("a", "b")
    paused = Flow("paused").wait("w")
    options = _options(chain, paused)
    client = fleet.adapter(options, stalled_after_seconds=0)
    done = await client.start_run("lost")
    fleet.start(options, workers=1)
    assert (await client.wait_for_result(done, TIMEOUT)).status == "completed"
    waiting = await client.start_run("paused")
    await _until(lambda: _status_is(client, waiting, "awaiting"), "the run to pause")

    async def lose(job: JobPayload) -> None:
        return None

    lossy = fleet.adapter(options)
    lossy.enqueue_job = lose  # type: ignore[method-assign]
    stalled = await lossy.start_run("lost")
    found = await client.find_stalled_runs()
    assert stalled in found
    assert done not in found
    assert waiting not in found
    assert await client.reconcile_stalled() == {stalled: 1}
    result = await client.wait_for_result(stalled, TIMEOUT)
    assert result.context["_outputs.b"] == 2
    assert stalled not in await client.find_stalled_runs()


async def _status_is(client: SqsAdapter, run: str, status: str) -> bool:
    return (await client.get_status(run)).status == status


async def test_workers_run_the_reconciler_in_the_background(fleet: Fleet) -> None:
    chain = Flow("lost").node("a", lambda c: 1).node("b", lambda c: c.input + 1).chain("a", "b")
    options = _options(chain)
    fleet.start(options, reconcile_interval_seconds=0.5, stalled_after_seconds=0.5)
    lossy = fleet.adapter(options)

    async def lose(job: JobPayload) -> None:
        return None

    lossy.enqueue_job = lose  # type: ignore[method-assign]
    run = await lossy.start_run("lost")
    result = await fleet.adapter(options).wait_for_result(run, TIMEOUT)
    assert result.status == "completed"


# ------------------------------------------------------------------------- settings


def test_tls_options_reach_both_clients_and_secrets_stay_hidden(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = AwsSettings(
        region_name="eu-west-1",
        aws_access_key_id="AKIDEXAMPLE",
        aws_secret_access_key="s3cret-key",
        aws_session_token="s3cret-token",
        verify="/etc/ssl/custom-ca.pem",
        client_cert=("/etc/ssl/client.pem", "/etc/ssl/client.key"),
    )
    assert "s3cret" not in repr(settings)
    with caplog.at_level(logging.DEBUG):
        clients = AwsClients(settings)
    try:
        assert "s3cret" not in caplog.text
        assert "s3cret" not in repr(clients)
        for client in (clients.sqs, clients.dynamodb):
            assert client._endpoint.http_session._verify == "/etc/ssl/custom-ca.pem"
            assert client.meta.config.client_cert == settings.client_cert
            assert client.meta.region_name == "eu-west-1"
    finally:
        clients.close()


async def test_aclose_closes_only_what_the_adapter_created(clients: AwsClients) -> None:
    options = _options(Flow("x").node("a", lambda c: 1))
    url = "https://sqs.us-east-1.amazonaws.com/1/jobs"
    shared = SqsAdapter(runtime_options=options, queue_url=url, clients=clients)
    await shared.aclose()
    assert not clients._closed
    owned = SqsAdapter(
        runtime_options=options, queue_url=url, aws=AwsSettings(region_name="us-east-1")
    )
    await owned.aclose()
    assert owned.clients._closed
    with pytest.raises(ValueError, match="not both"):
        SqsAdapter(runtime_options=options, queue_url=url, clients=clients, aws=AwsSettings())


async def test_api_calls_per_node_job_stay_bounded(fleet: Fleet) -> None:
    """Cost is O(delta): a chain's jobs make a fixed number of calls each."""
    flow = Flow("chain10")
    names = [f"n{i}" for i in range(10)]
    for name in names:
        flow.node(name, lambda c: (c.input or 0) + 1)
    flow.chain(*names)
    options = _options(flow)
    fleet.start(options, workers=1)
    client = fleet.adapter(options)
    await client.wait_for_result(await client.start_run("chain10"), TIMEOUT)  # warm up
    fleet.clients.reset_api_calls()
    run = await client.start_run("chain10")
    await _until(lambda: fleet.clients.api_calls["dynamodb.UpdateItem"] >= 10, "commits")
    result = await client.wait_for_result(run, TIMEOUT, poll_interval=1.0)
    assert result.context["_outputs.n9"] == 10
    calls = fleet.clients.api_calls
    worker_calls = sum(calls.values()) - calls["sqs.ReceiveMessage"]
    assert worker_calls / len(names) < 14, dict(calls)


async def test_a_fan_out_is_sent_in_batches(fleet: Fleet) -> None:
    """A node with 12 successors: two SendMessageBatch requests (10 + 2), not 12 sends."""
    flow = Flow("fan12").node("s", lambda c: 1).node("j", lambda c: sum(c.input.values()))
    for i in range(12):
        flow.node(f"b{i}", lambda c, i=i: c.input + i).edge("s", f"b{i}").edge(f"b{i}", "j")
    options = _options(flow)
    fleet.start(options, workers=1)
    client = fleet.adapter(options)
    fleet.clients.reset_api_calls()
    result = await client.wait_for_result(await client.start_run("fan12"), TIMEOUT)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.j"] == sum(1 + i for i in range(12))
    calls = fleet.clients.api_calls
    assert calls["sqs.SendMessageBatch"] == 2, dict(calls)
    assert calls["sqs.SendMessage"] == 2, dict(calls)  # the start node and the join
