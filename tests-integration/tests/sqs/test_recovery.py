"""Issue 22 on SQS (moto): recovery after a SIGKILL with the default settings (item 8),
two blueprint versions on one queue (item 7), and hand-backs that use up no attempt
(item 6)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft.testing import Fleet
from flowcraft_backends import RunningService
from flowcraft_backends.probes import (
    check_version_skew,
    hold_flow,
    measure_recovery,
    report_recovery,
)
from flowcraft_sqs import AwsClients, SqsAdapter, create_queues, create_table
from flowcraft_sqs.adapter import DEFAULT_LEASE_SECONDS, DEFAULT_VISIBILITY_SECONDS

from .sqs_fleet import Settings

pytestmark = pytest.mark.slow

FLEET = Path(__file__).with_name("sqs_fleet.py")
BOUND_SECONDS = 10.0
"""The documented bound (SqsAdapter's visibility_timeout): every kill must recover in it."""
REDRIVE_BOUND = 6


@pytest.fixture
async def probe(moto_service: RunningService, tmp_path: Path) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    extra = moto_service.extra
    settings = Settings(
        effects_path=str(tmp_path / "journal.jsonl"),
        endpoint_url=moto_service.url,
        region=extra["region"],
        access_key=extra["aws_access_key_id"],
        queue_url="",
        table=f"probe-{tag}",
        namespace=f"probe-{tag}",
        recovery_defaults=True,
    )
    clients = AwsClients(settings.aws())
    try:
        await create_table(clients, settings.table)
        # A low redrive bound: SQS counts every hand-back as a receive, so version
        # hand-backs reach it within seconds unless the worker re-sends them near it.
        queues = await create_queues(clients, f"probe-{tag}", max_receive_count=REDRIVE_BOUND)
        settings.queue_url = queues.queue_url
        yield settings
        await clients.dynamodb_call("delete_table", TableName=settings.table)
        for url in (queues.queue_url, queues.dead_letter_queue_url):
            await clients.sqs_call("delete_queue", QueueUrl=url)
    finally:
        clients.close()


async def test_sigkill_recovery_with_default_settings(probe: Settings) -> None:
    bp = hold_flow().to_blueprint()
    client = probe.adapter(RuntimeOptions(blueprints={bp.id: bp}))
    try:
        recoveries = await measure_recovery(FLEET, probe, client)
    finally:
        await client.aclose()
    print(
        report_recovery(
            f"sqs (visibility {DEFAULT_VISIBILITY_SECONDS} s, lease {DEFAULT_LEASE_SECONDS} s)",
            recoveries,
        )
    )
    assert max(recoveries) < BOUND_SECONDS, recoveries


async def test_two_blueprint_versions_on_one_queue(probe: Settings) -> None:
    await check_version_skew(lambda options: probe.adapter(options))


async def test_hand_backs_use_up_no_attempt_in_queue_mode(probe: Settings) -> None:
    """The issue's mixed-version fleet in queue retry mode: 10 runs whose first node
    fails on its first attempt and is allowed two; a worker lacking the version hands
    every job back, alone at first, well past the queue's redrive bound. Each run's
    first execution is attempt 1, every run completes and nothing is dead-lettered
    (5 of 10 failed when the receive count numbered the attempts; 8 of 10 were parked
    by SQS's redrive before hand-backs near the bound were re-sent)."""
    clients = AwsClients(probe.aws())
    attempts: dict[str, list[int]] = {}

    def flow(version: str) -> Flow:
        def flaky(ctx: NodeContext) -> str:
            attempts.setdefault(ctx.run_id, []).append(ctx.attempt)
            if ctx.attempt < 2:
                raise RuntimeError("transient")
            return "ok"

        return Flow("handback", version=version).node("f", flaky, max_retries=2)

    def build(options: RuntimeOptions, **kw: Any) -> SqsAdapter:
        return SqsAdapter(
            runtime_options=options,
            queue_url=probe.queue_url,
            table_name=probe.table,
            namespace=probe.namespace,
            key_prefix=f"{probe.namespace}:",
            clients=clients,
            wait_time_seconds=1,
            retry_mode="queue",
            retry_delay_seconds=0.5,
            **kw,
        )

    fleet = Fleet(build, RuntimeOptions.from_flows(flow("1")), timeout=120)
    try:
        await fleet.start(1, RuntimeOptions.from_flows(flow("2")))  # hands every job back
        runs = [await fleet.client.start_run("handback") for _ in range(10)]
        # Alone, the incompatible worker bounces every job past the redrive bound.
        deadline = asyncio.get_running_loop().time() + 60
        while len(fleet.events_of("job:requeued")) < 10 * (REDRIVE_BOUND + 2):
            assert asyncio.get_running_loop().time() < deadline, "too few hand-backs"
            await asyncio.sleep(0.2)
        await fleet.start(1)
        try:
            results = [await fleet.client.wait_for_result(r, 120) for r in runs]
        except TimeoutError:
            letters = await fleet.client.dead_letters()
            statuses = [await fleet.status(r) for r in runs]
            raise AssertionError(
                f"{statuses}; attempts {attempts}; dead letters {letters}"
            ) from None
        letters = await fleet.client.dead_letters()
    finally:
        await fleet.stop()
        clients.close()
    assert letters == [], letters
    assert [r.status for r in results] == ["completed"] * 10, [r.errors for r in results]
    assert all(attempts[r] == [1, 2] for r in runs), attempts
