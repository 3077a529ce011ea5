"""The root README's walk-through, driven through the CLI on a real Redis (bullmq): a
worker for two examples with ``--trace-file`` and ``--metrics-port``; from a second
"terminal" a run started with ``--wait`` finishes; another, paused at a human
approval, is cancelled; the trace file holds one connected trace per run (the
starting command's span and the node spans of the worker under it), and the
Prometheus endpoint counts what happened."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from flowcraft_backends import RunningService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))
ROOT = Path(__file__).parents[3]
ORDER = {"sku": "SSD-2TB-NVME", "quantity": 10, "max_days": 5}
CLAIM = {"claim": {"id": "EXP-1", "employee": "sam@example.com", "amount": 486.2}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_readme_walk_through(redis_service: RunningService, tmp_path: Path) -> None:
    ns = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "FLOWCRAFT_ADAPTER": "bullmq",
        "FLOWCRAFT_BULLMQ_URL": redis_service.url,
        "FLOWCRAFT_BULLMQ_KEY_PREFIX": f"walk{ns}:",
        "FLOWCRAFT_BULLMQ_QUEUE_NAME": f"walk{ns}",
        "FLOWCRAFT_FLOWS": "examples/fan_out.py:flow,examples/human_approval.py:flow",
        "FLOWCRAFT_HISTORY": str(tmp_path / "history.db"),
    }
    spans = tmp_path / "spans.jsonl"
    port = _free_port()

    def flowcraft(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLOWCRAFT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )

    log = tmp_path / "worker.log"
    history = tmp_path / "history.db"
    command = [FLOWCRAFT, "worker", "--trace-file", str(spans)]
    command += ["--history-spool", str(tmp_path / "spool"), "--history-drainer"]
    command += ["--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
    with log.open("wb") as out:
        worker = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 60
        while "worker started" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "blueprints=supplier-fan-out, expense-approval" in log.read_text()

        # terminal 2: a run that finishes, watched node by node
        order = json.dumps(ORDER)
        done = flowcraft(
            "start", "supplier-fan-out", "--context", order, "--wait", "--trace-file", str(spans)
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["quotes_received"] == 5
        assert "done    choose" in done.stderr
        assert "started run" in done.stderr
        fan_out_run = done.stderr.split("started run ")[1].split(";")[0]

        # another that waits for a human: cancel it
        started = flowcraft("start", "expense-approval", "--context", json.dumps(CLAIM))
        assert started.returncode == 0, started.stderr
        run_id = started.stdout.strip()
        deadline = time.monotonic() + 30
        while not (status := flowcraft("status", run_id)).stdout.startswith(
            f"run {run_id}: awaiting"
        ):
            assert time.monotonic() < deadline, status.stdout + status.stderr
            time.sleep(0.2)
        assert "waiting: manager_approval" in status.stdout
        cancelled = flowcraft("cancel", run_id)
        assert (cancelled.returncode, cancelled.stdout.strip()) == (0, f"run {run_id}: cancelled")
        assert json.loads(flowcraft("status", run_id, "--json").stdout)["status"] == "cancelled"
        active = subprocess.run(
            [FLOWCRAFT, "runs"],
            cwd=ROOT,
            env={k: v for k, v in env.items() if k != "FLOWCRAFT_HISTORY"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert active.stdout.strip() == "no active runs"
        # with a run history (FLOWCRAFT_HISTORY), runs lists the recent ones too, and
        # history prints a run's timeline
        deadline = time.monotonic() + 30
        while True:
            listed = json.loads(flowcraft("runs", "--json").stdout)
            recent = {r["runId"]: (r["status"], r["blueprintId"]) for r in listed}
            if recent.get(fan_out_run) == ("completed", "supplier-fan-out"):
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.2)
        assert recent[run_id] == ("cancelled", "expense-approval")
        shown = flowcraft("runs").stdout.splitlines()
        assert f"{run_id}  cancelled  expense-approval" in shown
        timeline = flowcraft("history", fan_out_run, "--store", str(history))
        assert timeline.returncode == 0, timeline.stderr
        assert "choose" in timeline.stdout, timeline.stdout
        # the commands recorded what they did: the starts, the cancel's final status
        cancelled_history = json.loads(flowcraft("history", run_id, "--json").stdout)
        assert cancelled_history["run"]["status"] == "cancelled"
        assert cancelled_history["run"]["blueprintId"] == "expense-approval"
        kinds = [e["kind"] for e in cancelled_history["events"]]
        assert kinds[0] == "workflow:start"
        assert kinds[-1] == "workflow:finish"
        assert "node:awaiting" in kinds  # the approval it waited for

        # the metrics
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            metrics = page.read().decode()
        processed = [
            line
            for line in metrics.splitlines()
            if line.startswith("flowcraft_jobs_total{") and 'outcome="processed"' in line
        ]
        assert processed, metrics
        assert sum(float(line.rsplit(" ", 1)[1]) for line in processed) >= 9
        assert "flowcraft_job_duration_seconds_count" in metrics
        assert "flowcraft_runs_finished_total{" in metrics
        assert "flowcraft_queue_depth" in metrics

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    # the trace: the start command's span, and the worker's node spans under it
    found = _spans(spans)
    root = [s for s in found if s["name"] == "flowcraft.start supplier-fan-out"]
    assert len(root) == 1
    nodes = [s for s in found if s["attributes"].get("flowcraft.run") == fan_out_run]
    assert len(nodes) == 7  # quote, five suppliers, choose
    assert {s["context"]["trace_id"] for s in nodes} == {root[0]["context"]["trace_id"]}
    assert {s["parent_id"] for s in nodes} == {root[0]["context"]["span_id"]}
