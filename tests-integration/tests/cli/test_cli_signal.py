"""``flowcraft signal`` and the timers in ``flowcraft status``, end to end: a
``flowcraft worker`` on a real Redis (bullmq), commands run as a user types them. A
signal by token resumes a run that waits for an event; the same signal again is a
no-op (exit 0); a signal that no wait takes (a sleeping run, a wait whose timeout
fired, a different payload after the winner, an unknown token) is refused (exit 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from flowcraft.cli import main
from flowcraft_backends import RunningService, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    from flowcraft import Flow

    async def charge(ctx):
        return {"id": await ctx.get("order")}

    async def ship(ctx):
        return f"shipped {ctx.input['tx']}"

    def payment(timeout):
        return (
            Flow(f"pay-{timeout}")
            .node("charge", charge)
            .wait_for("payment", "paid", token_from="input.id", timeout=timeout)
            .node("ship", ship)
            .node("drop", lambda ctx: "timed out")
            .chain("charge", "payment")
            .edge("payment", "ship")
            .edge("payment", "drop", action="timeout")
        )

    nap = Flow("nap").sleep("nap", "1h").node("after", lambda ctx: "woke").edge("nap", "after")

    flows = [payment("1h"), payment("300ms"), nap]
"""


class Fleet:
    """One test's environment: its own queue and key prefix on the shared Redis."""

    def __init__(self, redis_url: str, flows: Path, tmp: Path) -> None:
        ns = uuid.uuid4().hex[:8]
        self.ns = ns
        self.tmp = tmp
        self.env = {
            **os.environ,
            "FLOWCRAFT_ADAPTER": "bullmq",
            "FLOWCRAFT_BULLMQ_URL": redis_url,
            "FLOWCRAFT_BULLMQ_KEY_PREFIX": f"sig{ns}:",
            "FLOWCRAFT_BULLMQ_QUEUE_NAME": f"q{ns}",
            "FLOWCRAFT_FLOWS": f"{flows}:flows",
        }
        self.workers: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """A command in its own process, as a user (or a webhook's script) runs it."""
        return subprocess.run(
            [FLOWCRAFT, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The same command in this process (the same code from ``main`` down, without
        a process start-up: the checks that need no separate process)."""
        result = CliRunner().invoke(main, list(args), env=self.env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(
            list(args), result.exit_code, result.stdout, result.stderr
        )

    def worker(self) -> None:
        log = self.tmp / "worker.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([FLOWCRAFT, "worker"], env=self.env, stderr=out)
        self.workers.append(proc)
        wait_for(lambda: "worker started" in log.read_text(), f"worker start ({log})")

    def status(self, run_id: str) -> dict[str, object]:
        shown = self.cli("status", run_id, "--json")
        assert shown.returncode == 0, shown.stderr
        found: dict[str, object] = json.loads(shown.stdout)
        return found

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


def test_signal_resumes_a_wait_once_and_refuses_what_no_wait_takes(
    fleet: Fleet,
) -> None:
    fleet.worker()
    order = f"o-{fleet.ns}"
    run_id = fleet.run("start", "pay-1h", "--context", json.dumps({"order": order})).stdout
    run_id = run_id.strip()
    napping = fleet.cli("start", "nap").stdout.strip()
    late_order = f"late-{fleet.ns}"
    late_run = fleet.cli("start", "pay-300ms", "--context", json.dumps({"order": late_order}))
    late_run = late_run.stdout.strip()

    # status: the event wait (event, token, timeout) and the sleep (until when)
    wait_for(lambda: fleet.status(run_id)["status"] == "awaiting", "the wait to pause")
    shown = fleet.status(run_id)
    assert shown["waiting"] == ["payment"]
    [timer] = shown["timers"]  # type: ignore[misc]
    assert (timer["nodeId"], timer["kind"], timer["event"], timer["token"]) == (
        "payment",
        "wait",
        "paid",
        order,
    )
    assert time.time() + 3500 < timer["until"] < time.time() + 3601
    human = fleet.cli("status", run_id).stdout.splitlines()
    assert human[:2] == [f"run {run_id}: awaiting", "  waiting: payment"]
    assert human[2].startswith(f"  waiting for event: paid at payment, token {order}, timeout at ")
    wait_for(lambda: fleet.status(napping)["timers"], "the sleep to record its wake-up time")
    slept = fleet.cli("status", napping).stdout.splitlines()
    assert slept[0] == f"run {napping}: running"
    assert slept[1].startswith("  sleeping: nap until ")
    assert "(in 3" in slept[1]

    # a run that waits for no event (it sleeps) refuses the signal: exit 5
    refused = fleet.cli("signal", napping, "paid")
    assert refused.returncode == 5, refused.stderr
    assert "nothing waits for the event 'paid'" in refused.stderr
    # bad input: exit 2, nothing sent
    assert fleet.cli("signal", order, "paid", "--payload", "{nope").returncode == 2
    # an unknown token, told apart from a run id by --token: exit 5
    unknown = fleet.cli("signal", "--token", f"nobody-{fleet.ns}", "paid")
    assert unknown.returncode == 5
    assert "no waiting run holds the token" in unknown.stderr

    # by token, with a payload from a file: resumed, exit 0
    payload = fleet.tmp / "payload.json"
    payload.write_text('{"tx": "T-1"}')
    resumed = fleet.run("signal", "--token", order, "paid", "--payload", f"@{payload}")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip() == f"{order}: paid: resumed"
    done = fleet.cli("wait", run_id, "--json", "--timeout", "30")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["context"]["_outputs.ship"] == "shipped T-1"
    # the same signal again (by token or run id): idempotent, exit 0 with a note
    again = fleet.run("signal", run_id, "paid", "--payload", '{"tx": "T-1"}', "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "target": run_id,
        "event": "paid",
        "resumed": False,
        "duplicate": True,
    }
    noted = fleet.cli("signal", order, "paid", "--payload", '{"tx": "T-1"}')
    assert noted.returncode == 0, noted.stderr
    assert "already resumed by this same signal" in noted.stdout
    # another payload after the winner: refused
    rival = fleet.cli("signal", order, "paid", "--payload", '{"tx": "T-2"}')
    assert rival.returncode == 5
    assert "nothing waits" in rival.stderr
    # so is a resume of the wait the signal resolved (exit 5, as signal's refusals)
    late_resume = fleet.cli("resume", run_id, "--action", "paid")
    assert late_resume.returncode == 5, late_resume.stderr
    assert "nothing to resume" in late_resume.stderr

    # a wait whose timeout fired (it took the timeout edge) refuses a late signal
    timed_out = fleet.cli("wait", late_run, "--json", "--timeout", "30")
    assert timed_out.returncode == 0, timed_out.stderr
    assert json.loads(timed_out.stdout)["context"]["_outputs.drop"] == "timed out"
    late = fleet.cli("signal", late_order, "paid", "--payload", '{"tx": "T-3"}', "--json")
    assert late.returncode == 5
    assert "nothing waits for the event 'paid'" in late.stderr
    assert late.stdout == ""
