"""Issue 22 on RabbitMQ, PostgreSQL and Redis: recovery after a SIGKILL with the
default settings (item 8), two blueprint versions on one queue (item 7), and a client
waiting for results across a PostgreSQL restart (item 5)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flowcraft import Flow, NodeContext, RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_backends.crash_fleet import restarter
from flowcraft_backends.probes import (
    check_version_skew,
    hold_flow,
    measure_recovery,
    report_recovery,
)
from flowcraft_rabbitmq.adapter import DEFAULT_LEASE_SECONDS

from .fleet import Settings

pytestmark = pytest.mark.slow

FLEET = Path(__file__).with_name("fleet.py")
BOUND_SECONDS = 10.0
"""The documented bound (RabbitMQAdapter's docstring): every kill must recover in it."""


@pytest.fixture
async def probe(
    rabbitmq_service: RunningService,
    postgres_service: RunningService,
    redis_service: RunningService,
    tmp_path: Path,
) -> AsyncIterator[Settings]:
    tag = uuid.uuid4().hex[:10]
    settings = Settings(
        effects_path=str(tmp_path / "journal.jsonl"),
        amqp_url=rabbitmq_service.url,
        postgres_dsn=postgres_service.url,
        redis_url=redis_service.url,
        queue_name=f"fc-probe-{tag}",
        table=f"fc_probe_{tag}",
        key_prefix=f"fc-probe:{tag}:",
        recovery_defaults=True,
    )
    yield settings
    client = settings.adapter(RuntimeOptions())
    try:
        await client.broker.delete_topology()
        pool = await client.store.pool()
        await pool.execute(
            f"DROP TABLE IF EXISTS {client.store.names.runs}, {client.store.names.versions}"
        )
    finally:
        await client.aclose()


async def test_sigkill_recovery_with_default_settings(probe: Settings) -> None:
    bp = hold_flow().to_blueprint()
    client = probe.adapter(RuntimeOptions(blueprints={bp.id: bp}))
    try:
        await client.connect()  # the queues exist before the first worker starts
        recoveries = await measure_recovery(FLEET, probe, client)
    finally:
        await client.aclose()
    print(report_recovery(f"rabbitmq (lease {DEFAULT_LEASE_SECONDS} s)", recoveries))
    assert max(recoveries) < BOUND_SECONDS, recoveries


async def test_two_blueprint_versions_on_one_queue(probe: Settings) -> None:
    await check_version_skew(lambda options: probe.adapter(options))


async def test_client_waits_across_a_postgres_restart(
    probe: Settings, postgres_service: RunningService
) -> None:
    """A client waiting for a result while PostgreSQL restarts gets it, and every later
    ``wait_for_result`` works (each failed for good with "released back to the pool")."""
    restart = restarter(postgres_service)
    gate = asyncio.Event()

    async def slow(ctx: NodeContext) -> str:
        await gate.wait()
        return "after the restart"

    flow = Flow("pg-restart").node("slow", slow).node("next", lambda c: c.input)
    flow.chain("slow", "next")
    options = RuntimeOptions.from_flows(flow)
    worker, client = probe.adapter(options), probe.adapter(options)
    task = asyncio.ensure_future(worker.worker())
    try:
        run = await client.start_run("pg-restart")
        waiting = asyncio.ensure_future(client.wait_for_result(run, 120))
        await asyncio.sleep(1.0)
        assert client.store.notifications.listening
        await asyncio.to_thread(restart)
        gate.set()
        result = await waiting
        assert result.status == "completed", result.errors
        assert result.context["_outputs.next"] == "after the restart"
        for _ in range(3):  # later waits work, and listen again
            later = await client.start_run("pg-restart")
            assert (await client.wait_for_result(later, 60)).status == "completed"
        assert client.store.notifications.listening
    finally:
        gate.set()
        await worker.stop()
        await asyncio.gather(task, return_exceptions=True)
        await worker.aclose()
        await client.aclose()
