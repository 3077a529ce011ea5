"""The reconciler on Miniflare: the namespace's registry object (the index of running
runs), ``find_stalled_runs`` and a worker's background reconciler re-driving a run
whose job was lost before it reached the inbox."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.context import PatchOperation
from flowcraft.distributed import keys as K
from flowcraft.distributed.payload import JobPayload
from flowcraft_cloudflare import CloudflareAdapter, WorkerClient

TIMEOUT = 60.0


class LossyAdapter(CloudflareAdapter):
    """Drops the first job sent for ``lose`` before it reaches the Worker: a message
    lost on its way to the inbox (the one loss the inbox itself cannot redeliver)."""

    def __init__(self, *, lose: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lose = lose
        self.lost: list[JobPayload] = []

    def _keep(self, job: JobPayload) -> bool:
        if job.node_id == self.lose and not self.lost:
            self.lost.append(job)
            return False
        return True

    async def enqueue_job(self, job: JobPayload) -> None:
        if self._keep(job):
            await super().enqueue_job(job)

    async def enqueue_jobs(self, jobs: Sequence[JobPayload]) -> None:
        kept = [job for job in jobs if self._keep(job)]
        if kept:
            await super().enqueue_jobs(kept)


def counted_chain(calls: Counter[tuple[str, str]]) -> Flow:
    def step(name: str) -> Callable[[NodeContext], int]:
        def run(ctx: NodeContext) -> int:
            calls[(ctx.run_id, name)] += 1
            return int(ctx.input or 0) + 1

        return run

    flow = Flow("lossy")
    for name in ("a", "b", "c"):
        flow.node(name, step(name))
    return flow.chain("a", "b", "c")


@pytest.fixture
def make(client: WorkerClient, namespace: str) -> Callable[..., CloudflareAdapter]:
    def build(flow: Flow, cls: type[CloudflareAdapter] = CloudflareAdapter, **kw: Any) -> Any:
        return cls(
            runtime_options=RuntimeOptions.from_flows(flow),
            client=client,
            namespace=namespace,
            queue_name=f"{namespace}-jobs",
            poll_seconds=0.5,
            **kw,
        )

    return build


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
async def running() -> AsyncIterator[list[CloudflareAdapter]]:
    """Workers started by a test, stopped after it."""
    started: list[CloudflareAdapter] = []
    yield started
    for worker in started:
        await worker.aclose()


def start(worker: CloudflareAdapter, running: list[CloudflareAdapter]) -> asyncio.Future[None]:
    running.append(worker)
    return asyncio.ensure_future(worker.worker())


async def test_the_worker_reconciler_redrives_a_job_lost_before_the_inbox(
    make: Callable[..., Any], running: list[CloudflareAdapter]
) -> None:
    calls: Counter[tuple[str, str]] = Counter()
    flow = counted_chain(calls)
    client: CloudflareAdapter = make(flow)
    lossy: LossyAdapter = make(flow, LossyAdapter, lose="b")
    task = start(lossy, running)
    run = await client.start_run("lossy")
    assert run in await client.active_runs()
    await until(lambda: _true(bool(lossy.lost)), "the job of b to be lost")
    await until(lambda: _true(calls[(run, "a")] == 1), "a to run")
    await asyncio.sleep(1.2)  # nothing moves: the run waits for a job that is gone
    assert (await client.get_status(run)).status == "running"
    assert await client.find_stalled_runs(60.0, 10) == []
    assert await client.find_stalled_runs(1.0, 10) == [run]
    # Found once per period: the next look within the period does not return it again.
    assert await client.find_stalled_runs(1.0, 10) == []
    await lossy.stop()
    await task

    # The same worker, now with its reconciler on: it re-enqueues b, the run completes.
    reconciling: LossyAdapter = make(
        flow, LossyAdapter, lose="b", reconcile_interval_seconds=0.5, stalled_after_seconds=1.0
    )
    reconciling.lost = lossy.lost  # b was lost once; nothing else is dropped
    start(reconciling, running)
    result = await client.wait_for_result(run, TIMEOUT)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.c"] == 3
    assert [calls[(run, n)] for n in "abc"] == [1, 1, 1]
    # The status is recorded (and the run leaves the index) just after the publication.
    await until(lambda: _not_indexed(client, run), "the run to leave the index")
    assert await client.find_stalled_runs(0.0, 10) == []


async def _true(value: bool) -> bool:
    return value


async def _not_indexed(client: CloudflareAdapter, run: str) -> bool:
    return run not in await client.active_runs()


async def test_only_running_runs_stay_in_the_index(
    make: Callable[..., Any], running: list[CloudflareAdapter]
) -> None:
    """A run enters the index when it starts, leaves it while it waits for a resume,
    enters again on the resume and leaves when it ends; a cancelled run leaves too."""
    flow = (
        Flow("approval")
        .node("draft", lambda c: "draft")
        .wait("review")
        .node("publish", lambda c: c.input)
        .chain("draft", "review")
        .edge("review", "publish", action="approve")
    )
    client: CloudflareAdapter = make(flow)
    idle = await client.start_run("approval")
    assert idle in await client.active_runs()
    assert idle in await client.find_stalled_runs(0.0, 100)
    await client.cancel_run(idle)
    assert idle not in await client.active_runs()

    start(make(flow), running)
    run = await client.start_run("approval")
    await until(lambda: _status_is(client, run, "awaiting"), "the run to wait for its resume")
    assert run not in await client.active_runs()
    assert run not in await client.find_stalled_runs(0.0, 100)
    await client.resume_with_action(run, "approve", output="final")
    result = await client.wait_for_result(run, TIMEOUT)
    assert result.status == "completed", result.errors
    await until(lambda: _not_indexed(client, run), "the run to leave the index")
    assert await client.find_stalled_runs(0.0, 100) == []


async def _status_is(client: CloudflareAdapter, run: str, status: str) -> bool:
    return (await client.get_status(run)).status == status


async def test_an_entry_whose_run_is_gone_is_dropped(
    make: Callable[..., Any],
) -> None:
    """An entry left by a lost removal (here: a run object purged behind the index's
    back) is dropped by the stall check, not returned."""
    flow = Flow("one").node("a", lambda c: 1)
    adapter: CloudflareAdapter = make(flow)
    run = await adapter.start_run("one")
    ctx = adapter.run_context(run)
    ctx.registry = None  # write the final status without telling the registry
    await ctx.patch([PatchOperation("set", K.STATUS, {"status": "failed", "errors": []})])
    assert run in await adapter.active_runs()
    assert await adapter.find_stalled_runs(0.0, 10) == []
    assert run not in await adapter.active_runs()


async def test_a_repeated_start_of_a_finished_run_leaves_no_entry(
    make: Callable[..., Any], running: list[CloudflareAdapter]
) -> None:
    """The start's patch enters the run before its guard is checked; when the guard
    refuses it (the run exists) and the run is no longer running, it leaves again."""
    flow = Flow("one").node("a", lambda c: 1)
    client: CloudflareAdapter = make(flow)
    start(make(flow), running)
    run = await client.start_run("one")
    assert (await client.wait_for_result(run, TIMEOUT)).status == "completed"
    await until(lambda: _not_indexed(client, run), "the run to leave the index")
    assert await client.start_run("one", run_id=run) == run  # the same start again
    assert run not in await client.active_runs()
