"""``flowcraft worker --adapter sqs`` on moto: a run started from the CLI completes, and
SIGTERM stops an idle worker promptly (exit 0) although its long poll (20 s) is still
in flight: the poll gets the base's short grace, then is abandoned, and the process
does not wait for the thread still blocked in it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from flowcraft_backends import RunningService
from flowcraft_sqs import AwsClients, AwsSettings, QueueUrls, create_queues, create_table

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    from flowcraft import Flow

    flow = Flow("pair").node("a", lambda ctx: 20).node("b", lambda ctx: ctx.input + 1)
    flow.edge("a", "b")
"""


async def _topology(aws: AwsSettings) -> tuple[str, QueueUrls]:
    clients = AwsClients(aws)
    try:
        table = f"cli{uuid.uuid4().hex[:8]}"
        await create_table(clients, table)
        return table, await create_queues(clients, f"jobs-{uuid.uuid4().hex[:8]}")
    finally:
        clients.close()


def test_sqs_worker_runs_a_run_and_stops_promptly_on_sigterm(
    moto_service: RunningService, tmp_path: Path
) -> None:
    extra = moto_service.extra
    aws = AwsSettings(
        endpoint_url=moto_service.url,
        region_name=extra["region"],
        aws_access_key_id=extra["aws_access_key_id"],
        aws_secret_access_key=extra["aws_secret_access_key"],
    )
    table, queues = asyncio.run(_topology(aws))
    flows = tmp_path / "flows.py"
    flows.write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": extra["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": extra["aws_secret_access_key"],
        "FLOWCRAFT_ADAPTER": "sqs",
        "FLOWCRAFT_FLOWS": f"{flows}:flow",
        "FLOWCRAFT_SQS_ENDPOINT_URL": moto_service.url,
        "FLOWCRAFT_SQS_REGION_NAME": extra["region"],
        "FLOWCRAFT_SQS_QUEUE_URL": queues.queue_url,
        "FLOWCRAFT_SQS_TABLE_NAME": table,
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([FLOWCRAFT, "worker", "--grace", "10"], env=env, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while "worker started" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        done = subprocess.run(
            [FLOWCRAFT, "start", "pair", "--wait", "--json", "--timeout", "60"],
            env=env,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["context"]["_outputs.b"] == 21
        time.sleep(1)  # idle: a long poll is in flight
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
        took = time.monotonic() - began
        print(f"sqs worker exited {took:.2f} s after SIGTERM with a long poll in flight")
        assert "worker stopped" in log.read_text()
        assert "SIGTERM: stopping" in log.read_text()
        assert "(exit 0)" in log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
