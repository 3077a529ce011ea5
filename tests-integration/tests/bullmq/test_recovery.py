"""Issue 22 on BullMQ and Redis: recovery after a SIGKILL with the default settings
(item 8) and two blueprint versions on one queue (item 7)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_backends.probes import (
    check_version_skew,
    hold_flow,
    measure_recovery,
    report_recovery,
)
from flowcraft_bullmq import BullMQSettings

from .bullmq_fleet import Settings

pytestmark = pytest.mark.slow

FLEET = Path(__file__).with_name("bullmq_fleet.py")
BOUND_SECONDS = 10.0
"""The documented bound (BullMQSettings' docstring): every kill must recover in it."""


@pytest.fixture
async def probe(redis_service: RunningService, tmp_path: Path) -> AsyncIterator[Settings]:
    prefix = f"fc-probe-{uuid.uuid4().hex[:10]}:"
    yield Settings(
        effects_path=str(tmp_path / "journal.jsonl"), redis_url=redis_service.url, key_prefix=prefix
    )
    client = redis_asyncio.Redis.from_url(redis_service.url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


async def test_sigkill_recovery_with_default_settings(probe: Settings) -> None:
    bp = hold_flow().to_blueprint()
    client = probe.adapter(RuntimeOptions(blueprints={bp.id: bp}))
    try:
        recoveries = await measure_recovery(FLEET, probe, client)
    finally:
        await client.aclose()
    s = BullMQSettings()
    print(
        report_recovery(
            f"bullmq (lease {s.lease_seconds} s, lock {s.lock_duration_seconds} s, "
            f"stalled checks every {s.stalled_interval_seconds} s)",
            recoveries,
        )
    )
    assert max(recoveries) < BOUND_SECONDS, recoveries


async def test_two_blueprint_versions_on_one_queue(probe: Settings) -> None:
    await check_version_skew(lambda options: probe.adapter(options))
