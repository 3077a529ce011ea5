"""The adapter's own paths on Miniflare that the kit does not reach: the fused admission
(the kit wraps contexts, which takes the base's step-by-step path) and its cost."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from flowcraft import Flow, RuntimeOptions
from flowcraft.distributed import keys as K
from flowcraft.distributed.payload import JobPayload
from flowcraft.distributed.pull import PullingAdapter
from flowcraft_cloudflare import CloudflareAdapter, WorkerClient, WorkerSettings


def chain() -> Flow:
    flow = Flow("chain5")
    names = [f"n{i}" for i in range(5)]
    for name in names:
        flow.node(name, lambda c: (c.input or 0) + 1)
    return flow.chain(*names)


@pytest.fixture
async def adapter(client: WorkerClient, namespace: str) -> AsyncIterator[CloudflareAdapter]:
    made = CloudflareAdapter(
        runtime_options=RuntimeOptions.from_flows(chain()),
        client=client,
        namespace=namespace,
        queue_name=f"{namespace}-jobs",
        poll_seconds=0.5,
    )
    yield made
    await made.aclose()


async def run_chain(adapter: CloudflareAdapter, worker_adapter: CloudflareAdapter) -> int:
    """Run the chain on ``worker_adapter``; the ``do`` calls that worker made."""
    calls = worker_adapter.client.requests
    before = calls["do"]
    run = await adapter.start_run("chain5")
    worker = asyncio.ensure_future(worker_adapter.worker())
    try:
        result = await adapter.wait_for_result(run, 60)
        assert result.status == "completed"
        assert result.context["_outputs.n4"] == 5
    finally:
        await worker_adapter.stop()
        await worker
    return calls["do"] - before


async def test_fused_admission_saves_two_calls_per_job(
    adapter: CloudflareAdapter, settings: WorkerSettings
) -> None:
    worker_adapter = CloudflareAdapter(
        runtime_options=RuntimeOptions.from_flows(chain()),
        settings=settings,
        namespace=adapter.namespace,
        queue_name=adapter.inbox.name,
        poll_seconds=0.5,
    )
    try:
        fused = await run_chain(adapter, worker_adapter)
        # The base's admission: the first read here, the second and the lease later.
        worker_adapter.admit = functools.partial(  # type: ignore[method-assign]
            PullingAdapter.admit, worker_adapter
        )
        stepwise = await run_chain(adapter, worker_adapter)
    finally:
        await worker_adapter.aclose()
    assert stepwise - fused == 5 * 2, (fused, stepwise)


async def test_admission_takes_the_lease_once(adapter: CloudflareAdapter) -> None:
    run = await adapter.start_run("chain5")
    bp = adapter.blueprint_for("chain5")
    job = JobPayload(run_id=run, blueprint_id="chain5", node_id="n0")
    ctx = adapter.create_context(run)
    first = await adapter.admit(ctx, job, bp, "me/1")
    second = await adapter.admit(ctx, job, bp, "you/2")
    assert first.leased is True
    assert second.leased is False
    assert first.state[K.META]["blueprintId"] == "chain5"
    assert first.found is not None
    assert first.found[K.activation("n0", 1)] == {"skip": False}
    lease = K.lease(adapter.key_prefix, run, "n0", 1)
    assert await adapter.coordination_store.get(lease) == "me/1"


@pytest.mark.parametrize(
    ("change", "leased"),
    [
        ({"_flowcraft.meta": {"blueprintId": "chain5", "version": "other"}}, None),
        ({"_flowcraft.status": {"status": "completed", "errors": []}}, None),
        ({"_flowcraft.w.n0": 1}, None),
        ({"_flowcraft.n.n0": 1}, None),  # resolved: activation 2 has no record
    ],
    ids=["other version", "final", "paused", "already resolved"],
)
async def test_admission_leaves_the_lease_when_the_base_would(
    adapter: CloudflareAdapter, change: dict[str, Any], leased: bool | None
) -> None:
    from flowcraft.context import PatchOperation

    run = await adapter.start_run("chain5", run_id=f"r-{uuid.uuid4().hex[:6]}")
    ctx = adapter.create_context(run)
    await ctx.patch([PatchOperation("set", k, v) for k, v in change.items()])
    job = JobPayload(run_id=run, blueprint_id="chain5", node_id="n0")
    admission = await adapter.admit(ctx, job, adapter.blueprint_for("chain5"), "me/1")
    assert admission.leased is leased
    assert await adapter.coordination_store.get(K.lease(adapter.key_prefix, run, "n0", 1)) is None


async def test_follow_up_marks_ride_along_with_the_ack(adapter: CloudflareAdapter) -> None:
    """A job's write-behind mark is registered just before its ack: the ack call carries
    it and the Worker writes it to the run object, so it costs no call of its own."""
    run = await adapter.start_run("chain5")
    await adapter.mark_followed_up(run, "n0", 1)
    before = adapter.client.requests.copy()
    await adapter.ack([])  # nothing to ack here: the marks still go, in the ack call
    key = K.followed_up(adapter.key_prefix, run, "n0", 1)
    assert await adapter.coordination_store.get(key) == "1"
    assert adapter.client.requests["inbox:ack"] - before["inbox:ack"] == 1
    await asyncio.sleep(0.1)  # past the marks' own flush delay: nothing left to send
    assert adapter.client.requests["marks"] == before["marks"]
