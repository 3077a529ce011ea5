"""Issue 22 on Cloudflare (Miniflare): recovery after a SIGKILL with the default
settings (item 8) and two blueprint versions on one queue (item 7)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from flowcraft import RuntimeOptions
from flowcraft_backends import RunningService
from flowcraft_backends.probes import (
    check_version_skew,
    hold_flow,
    measure_recovery,
    report_recovery,
)
from flowcraft_cloudflare import worker_dir
from flowcraft_cloudflare.adapter import DEFAULT_LEASE_SECONDS, DEFAULT_VISIBILITY_SECONDS

from .cf_fleet import Settings

pytestmark = pytest.mark.slow

FLEET = Path(__file__).with_name("cf_fleet.py")
BOUND_SECONDS = 10.0
"""The documented bound (the README's recovery paragraph): every kill must recover in it."""


@pytest.fixture
def probe(miniflare_service: RunningService, tmp_path: Path) -> Settings:
    config = json.loads((worker_dir() / "miniflare.json").read_text())
    return Settings(
        effects_path=str(tmp_path / "journal.jsonl"),
        url=miniflare_service.url,
        secret=config["bindings"]["FLOWCRAFT_SECRET"],
        namespace=f"probe-{uuid.uuid4().hex[:10]}",
        recovery_defaults=True,
    )


async def test_sigkill_recovery_with_default_settings(probe: Settings) -> None:
    bp = hold_flow().to_blueprint()
    client = probe.adapter(RuntimeOptions(blueprints={bp.id: bp}))
    try:
        recoveries = await measure_recovery(FLEET, probe, client)
    finally:
        await client.aclose()
    print(
        report_recovery(
            f"cloudflare (visibility {DEFAULT_VISIBILITY_SECONDS} s, "
            f"lease {DEFAULT_LEASE_SECONDS} s)",
            recoveries,
        )
    )
    assert max(recoveries) < BOUND_SECONDS, recoveries


async def test_two_blueprint_versions_on_one_queue(probe: Settings) -> None:
    await check_version_skew(lambda options: probe.adapter(options))
