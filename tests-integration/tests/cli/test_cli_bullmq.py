"""The ``flowcraft`` command on a fleet, end to end: ``flowcraft worker`` processes on a
real Redis with the bullmq adapter, driven by ``start --wait``, ``status``, ``cancel``,
``wait``, ``resume`` and ``reconcile`` as a user types them (dead letters: see
test_cli_adapters); SIGTERM drains the jobs in hand (exit 0), or abandons them to the
queue once ``--grace`` has passed (exit 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcraft.cli import main
from flowcraft_backends import RunningService, wait_for
from flowcraft_backends._process import pid_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    import asyncio
    from pathlib import Path

    from flowcraft import Flow

    async def slow(ctx):
        # one line per attempt, so the test sees whether a job ran again
        marker = Path(await ctx.get("marker") or "/dev/null")
        with marker.open("a") as f:
            f.write("started\\n")
        first = marker.name == "null" or len(marker.read_text().splitlines()) == 1
        if first:
            await asyncio.sleep(float(await ctx.get("sleep") or 0))
        return "slept" if first else "again"

    async def add(ctx):
        return (await ctx.get("n") or 0) + 1

    flow = Flow("demo").node("slow", slow).node("add", add).edge("slow", "add")

    async def ship(ctx):
        return f"shipped ({ctx.input})"

    approval = (
        Flow("approval", version="2")
        .wait("approve")
        .node("ship", ship)
        .node("drop", lambda ctx: "dropped")
        .edge("approve", "ship", action="yes")
        .edge("approve", "drop", action="no")
    )

    flows = [flow, approval]
"""


class Fleet:
    """The environment one test's commands share: its own queue and key prefix."""

    def __init__(self, redis_url: str, flows: Path, tmp: Path) -> None:
        ns = uuid.uuid4().hex[:8]
        self.tmp = tmp
        self.redis_url = redis_url
        self.prefix = f"cli{ns}:"
        self.queue = f"q{ns}"
        self.env = {
            **os.environ,
            "FLOWCRAFT_ADAPTER": "bullmq",
            "FLOWCRAFT_BULLMQ_URL": redis_url,
            "FLOWCRAFT_BULLMQ_KEY_PREFIX": self.prefix,
            "FLOWCRAFT_BULLMQ_QUEUE_NAME": self.queue,
            "FLOWCRAFT_FLOWS": f"{flows}:flows",
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FLOWCRAFT, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def worker(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.tmp / f"worker{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([FLOWCRAFT, "worker", *args], env=self.env, stderr=out)
        self.workers.append(proc)
        wait_for(lambda: "worker started" in log.read_text(), f"worker start ({log})")
        return proc, log

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet(redis_service: RunningService, tmp_path: Path) -> Iterator[Fleet]:
    flows = tmp_path / "flows.py"
    flows.write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    fleet = Fleet(redis_service.url, flows, tmp_path)
    yield fleet
    fleet.close()


def test_start_wait_status_cancel_and_a_drained_sigterm(fleet: Fleet) -> None:
    worker, log = fleet.worker("-c", "4", "--grace", "20")
    started = log.read_text()
    assert "adapter=bullmq" in started
    assert f"queue={fleet.queue}" in started
    assert "concurrency=4" in started
    assert "blueprints=demo, approval@2" in started

    # start --wait: the result, exit 0
    done = fleet.run("start", "demo", "--context", '{"n": 41}', "--wait", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    assert result["context"]["_outputs.add"] == 42
    # for people: each node as it resolves, then the status, the context on stdout
    shown = fleet.run("start", "demo", "--context", '{"n": 1}', "--wait")
    assert shown.returncode == 0, shown.stderr
    assert "done    slow" in shown.stderr
    assert "done    add" in shown.stderr
    assert ": completed" in shown.stderr
    assert json.loads(shown.stdout)["_outputs.add"] == 2

    # a long run: status, cancel, status, wait
    context = fleet.tmp / "long.json"
    context.write_text(json.dumps({"sleep": 60, "marker": str(fleet.tmp / "long.txt")}))
    begun = fleet.run("start", "demo", "--context", f"@{context}")
    assert begun.returncode == 0, begun.stderr
    run_id = begun.stdout.strip()
    wait_for(lambda: (fleet.tmp / "long.txt").exists(), "the long node to start")
    status = fleet.run("status", run_id, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "running"
    cancelled = fleet.run("cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"run {run_id}: cancelled"
    assert json.loads(fleet.run("status", run_id, "--json").stdout)["status"] == "cancelled"
    waited = fleet.run("wait", run_id, "--json")
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["status"] == "cancelled"
    again = fleet.run("cancel", run_id, "--json")
    assert json.loads(again.stdout) == {"runId": run_id, "status": "cancelled"}

    # SIGTERM while a node runs: the node finishes, the worker exits 0
    marker = fleet.tmp / "drain.txt"
    begun = fleet.run("start", "demo", "--context", json.dumps({"sleep": 2, "marker": str(marker)}))
    run_id = begun.stdout.strip()
    wait_for(marker.exists, "the node to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    text = log.read_text()
    assert "SIGTERM: stopping" in text
    assert "worker stopped" in text
    assert "(exit 0)" in text
    # the drained node committed: a new worker runs only its successor
    fleet.worker()
    finished = fleet.run("wait", run_id, "--json", "--timeout", "30")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["context"]["_outputs.slow"] == "slept"
    assert marker.read_text().splitlines() == ["started"]


def test_a_drain_past_the_grace_hands_the_job_back(fleet: Fleet) -> None:
    worker, log = fleet.worker("--grace", "1")
    marker = fleet.tmp / "abandoned.txt"
    begun = fleet.run(
        "start", "demo", "--context", json.dumps({"sleep": 120, "marker": str(marker)})
    )
    run_id = begun.stdout.strip()
    wait_for(marker.exists, "the node to start")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 4
    assert "abandoning the jobs still in hand" in log.read_text()
    # BullMQ gives the abandoned job to the next worker once its lock expires
    fleet.worker()
    finished = fleet.run("wait", run_id, "--json", "--timeout", "60")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["context"]["_outputs.slow"] == "again"
    assert marker.read_text().splitlines() == ["started", "started"]


def test_bad_adapter_and_settings_exit_2_without_echoing_values(fleet: Fleet) -> None:
    unknown = fleet.run("status", "x", "--adapter", "nope")
    assert unknown.returncode == 2
    assert "no adapter named 'nope'" in unknown.stderr
    assert "bullmq" in unknown.stderr
    result = CliRunner().invoke(
        main, ["status", "x", "--adapter", "bullmq", "-o", "concurrency=s3cr3t"]
    )
    assert result.exit_code == 2
    assert "concurrency (FLOWCRAFT_BULLMQ_CONCURRENCY)" in result.stderr
    assert "s3cr3t" not in result.output
    no_flows = fleet.run("worker", "--flows", "")
    assert no_flows.returncode == 2


def test_resume_a_waiting_run_and_reconcile_it(fleet: Fleet) -> None:
    fleet.worker()
    run_id = fleet.run("start", "approval").stdout.strip()

    def awaiting() -> bool:
        shown = json.loads(fleet.run("status", run_id, "--json").stdout)
        return bool(shown["status"] == "awaiting" and shown["waiting"] == ["approve"])

    wait_for(awaiting, "the run to pause at its wait node")
    human = fleet.run("status", run_id)
    assert human.stdout.splitlines() == [f"run {run_id}: awaiting", "  waiting: approve"]
    reconciled = fleet.run("reconcile", run_id, "--json")
    assert reconciled.returncode == 0, reconciled.stderr
    assert json.loads(reconciled.stdout) == {"enqueued": {run_id: 0}}
    recorded = fleet.tmp / "resumes.db"  # the command records what it did (--history)
    resumed = fleet.run(
        "resume", run_id, "--action", "yes", "--output", '"by Ada"', "--history", str(recorded)
    )
    assert resumed.returncode == 0, resumed.stderr
    shown = json.loads(fleet.run("history", run_id, "--store", str(recorded), "--json").stdout)
    assert [(e["kind"], e["data"]["output"]) for e in shown["events"]] == [
        ("workflow:resume", "by Ada"),
        ("node:finish", "by Ada"),  # the waiting node's, resolved by the resume
    ]
    assert resumed.stdout.strip() == f"run {run_id}: resumed"
    done = fleet.run("wait", run_id, "--json", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    context = json.loads(done.stdout)["context"]
    assert context["_outputs.ship"] == "shipped (by Ada)"
    assert "_outputs.drop" not in context
    twice = fleet.run("resume", run_id, "--action", "no")
    assert twice.returncode == 5  # refused: the run has ended
    assert "has ended (completed)" in twice.stderr


def test_processes_runs_several_workers_and_forwards_sigterm(fleet: Fleet) -> None:
    """Also: the children spool history, and the one drain process the supervisor
    starts beside them stores it with the supervisor's size cap."""
    history = fleet.tmp / "history.db"
    spool = fleet.tmp / "spool"
    supervisor, log = fleet.worker(
        "--processes", "2", "-c", "2", "--history", str(history), "--history-max-value-bytes", "4",
        "--history-spool", str(spool), "--history-drainer",
    )  # fmt: skip
    wait_for(lambda: log.read_text().count("worker started") == 2, "both worker processes")
    # A drain process killed is started again (the events wait in the spool meanwhile).
    drainer = int(log.read_text().split("history drain process started: pid ")[1].split()[0])
    os.kill(drainer, signal.SIGKILL)
    wait_for(lambda: "history drain exited (-9); started again" in log.read_text(), "a new drainer")
    pids = {
        line.partition(" pid=")[2].split()[0]
        for line in log.read_text().splitlines()
        if "worker started" in line
    }
    assert len(pids) == 2
    assert str(supervisor.pid) not in pids
    run_id = uuid.uuid4().hex
    done = fleet.run(
        "start", "demo", "--context", '{"n": 1}', "--run-id", run_id, "--wait", "--json"
    )
    assert done.returncode == 0, done.stderr
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    shown = fleet.run("history", run_id, "--store", str(history), "--json")
    assert shown.returncode == 0, shown.stderr
    recorded = json.loads(shown.stdout)
    assert recorded["run"]["status"] == "completed"
    outputs = {s["nodeId"]: (s["output"], s["truncated"]) for s in recorded["steps"]}
    assert outputs["add"] == (2, ["input"])  # "2" fits in 4 bytes, '"slept"' does not
    assert outputs["slow"][1] == ["output"]
    assert outputs["slow"][0]["$flowcraft.truncated"]["bytes"] == len('"slept"')
    text = log.read_text()
    assert text.count("SIGTERM: stopping") == 2
    assert text.count("(exit 0)") == 2
    assert "all 2 worker processes stopped (exit [0, 0])" in text
    assert "history drain stopped" in text
    assert text.count("history drain process started") == 2
    assert list(spool.glob("*.spool")) == []  # stored, then deleted


def test_a_supervisor_killed_takes_its_workers_and_drainer_with_it(fleet: Fleet) -> None:
    """SIGKILL (the OOM killer, say) reaches no child of ``--processes``: each sees its
    supervisor gone within a second and stops as on SIGTERM, the drainer after a
    last pass."""
    history = fleet.tmp / "history.db"
    spool = fleet.tmp / "spool"
    supervisor, log = fleet.worker(
        "--processes", "1", "--history", str(history), "--history-spool", str(spool),
        "--history-drainer",
    )  # fmt: skip
    text = log.read_text()
    child = int(text.split("supervising 1 worker processes: [")[1].split("]")[0])
    drainer = int(text.split("history drain process started: pid ")[1].split()[0])
    assert pid_alive(child)
    assert pid_alive(drainer)
    supervisor.kill()
    supervisor.wait()
    wait_for(lambda: not pid_alive(child) and not pid_alive(drainer), "the children to stop")
    text = log.read_text()
    assert text.count(f"supervisor {supervisor.pid} gone: stopping as on SIGTERM") == 2
    assert "history drain stopped" in text
