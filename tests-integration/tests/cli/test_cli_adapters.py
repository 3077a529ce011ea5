"""The fleet commands end to end on five more adapters (rabbitmq, gcp, azure, kafka,
cloudflare), one parametrised scenario on each real backend: a run started before any
worker is listed by ``runs`` (where the adapter keeps an index of active runs); a
``flowcraft worker`` subprocess finishes it (``wait``), runs ``start --wait``, and a
run paused at a wait node is cancelled (``status``, ``cancel``); a body that is no
job is dead-lettered, then ``dead-letters requeue`` puts it back (it is parked
again) and ``purge`` deletes it, or both say clearly that the queue cannot; SIGTERM
stops the worker (exit 0). The operator commands run in-process (click's runner) to
keep the scenario cheap; the worker is a real process."""

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flowcraft.adapters import build_adapter
from flowcraft.cli import main
from flowcraft.runtime import RuntimeOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    from flowcraft import Flow

    pair = Flow("pair").node("a", lambda ctx: 20).node("b", lambda ctx: ctx.input + 1)
    pair.edge("a", "b")
    approval = Flow("approval").wait("approve").node("ship", lambda ctx: "shipped")
    approval.edge("approve", "ship", action="yes")
    flows = [pair, approval]
"""


def _rabbitmq(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    return {
        "FLOWCRAFT_RABBITMQ_URL": fixture("rabbitmq_service").url,
        "FLOWCRAFT_RABBITMQ_POSTGRES_DSN": fixture("postgres_service").url,
        "FLOWCRAFT_RABBITMQ_REDIS_URL": fixture("redis_service").url,
        "FLOWCRAFT_RABBITMQ_QUEUE_NAME": f"cli{ns}",
        "FLOWCRAFT_RABBITMQ_TABLE": f"cli{ns}",
        "FLOWCRAFT_RABBITMQ_KEY_PREFIX": f"cli{ns}:",
    }


def _gcp(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    return {
        "PUBSUB_EMULATOR_HOST": fixture("pubsub_service").url,
        "FIRESTORE_EMULATOR_HOST": fixture("firestore_service").url,
        "FLOWCRAFT_GCP_PROJECT": f"fc-cli-{ns}",
        "FLOWCRAFT_GCP_REDIS_URL": fixture("redis_service").url,
        "FLOWCRAFT_GCP_KEY_PREFIX": f"cli{ns}:",
    }


def _azure(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    cosmos = fixture("cosmos_service")
    return {
        "FLOWCRAFT_AZURE_STORAGE_CONNECTION_STRING": fixture("azurite_service").extra[
            "connection_string"
        ],
        "FLOWCRAFT_AZURE_COSMOS_URL": cosmos.url,
        "FLOWCRAFT_AZURE_COSMOS_KEY": cosmos.extra["key"],
        "FLOWCRAFT_AZURE_REQUIRE_STRONG_CONSISTENCY": "false",  # the emulator's Session
        "FLOWCRAFT_AZURE_COSMOS_ENDPOINT_DISCOVERY": "false",
        "FLOWCRAFT_AZURE_REDIS_URL": fixture("redis_service").url,
        "FLOWCRAFT_AZURE_QUEUE_NAME": f"cli{ns}",
        "FLOWCRAFT_AZURE_CONTAINER": f"cli{ns}",
        "FLOWCRAFT_AZURE_KEY_PREFIX": f"cli{ns}:",
    }


def _kafka(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    cassandra = fixture("cassandra_service")
    host, _, port = cassandra.url.rpartition(":")
    return {
        "FLOWCRAFT_KAFKA_BOOTSTRAP_SERVERS": fixture("kafka_service").url,
        "FLOWCRAFT_KAFKA_TOPIC": f"cli{ns}",
        "FLOWCRAFT_KAFKA_GROUP_ID": f"cli{ns}",
        "FLOWCRAFT_KAFKA_REDIS_URL": fixture("redis_service").url,
        "FLOWCRAFT_KAFKA_CASSANDRA_CONTACT_POINTS": host,
        "FLOWCRAFT_KAFKA_CASSANDRA_PORT": port,
        "FLOWCRAFT_KAFKA_CASSANDRA_LOCAL_DATACENTER": cassandra.extra.get(
            "local_datacenter", "datacenter1"
        ),
        "FLOWCRAFT_KAFKA_CASSANDRA_KEYSPACE": "flowcraft_cli",  # runs apart by namespace
        "FLOWCRAFT_KAFKA_NAMESPACE": f"cli{ns}",
        "FLOWCRAFT_KAFKA_KEY_PREFIX": f"cli{ns}:",
    }


def _cloudflare(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    from flowcraft_cloudflare._client import worker_dir

    config = json.loads((worker_dir() / "miniflare.json").read_text())
    return {
        "FLOWCRAFT_CLOUDFLARE_URL": fixture("miniflare_service").url,
        "FLOWCRAFT_CLOUDFLARE_SECRET": config["bindings"]["FLOWCRAFT_SECRET"],
        "FLOWCRAFT_CLOUDFLARE_NAMESPACE": f"cli{ns}",
        "FLOWCRAFT_CLOUDFLARE_QUEUE_NAME": f"cli{ns}-jobs",
    }


BACKENDS = {
    "rabbitmq": _rabbitmq,
    "gcp": _gcp,
    "azure": _azure,
    "kafka": _kafka,
    "cloudflare": _cloudflare,
}
LISTS_ACTIVE_RUNS = {"gcp", "azure"}
REQUEUES_DEAD_LETTERS = {"rabbitmq", "gcp", "azure"}


class Fleet:
    """One adapter's environment for the scenario, and the commands run on it."""

    def __init__(self, name: str, env: dict[str, str], tmp: Path) -> None:
        self.name = name
        self.env = {"FLOWCRAFT_ADAPTER": name, **env}
        self.tmp = tmp
        self.runner = CliRunner()
        self.worker_process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> Result:
        return self.runner.invoke(main, list(args), env=self.env, catch_exceptions=False)

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def until(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{self.name}: timed out waiting for {what}"
            time.sleep(0.2)

    def start_worker(self) -> Path:
        log = self.tmp / "worker.log"
        with log.open("wb") as out:
            self.worker_process = subprocess.Popen(
                [FLOWCRAFT, "worker", "--grace", "10"], env={**os.environ, **self.env}, stderr=out
            )
        process = self.worker_process

        def started() -> bool:
            assert process.poll() is None, log.read_text()
            return "worker started" in log.read_text()

        self.until(started, "the worker to start")
        return log

    def adapter_call(self, call: Callable[[Any], Any]) -> Any:
        """Run ``call(adapter)`` on an adapter built from the same settings."""

        async def go() -> Any:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                adapter, _, _ = build_adapter(self.name, RuntimeOptions())
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
            try:
                return await call(adapter)
            finally:
                await adapter.aclose()

        return asyncio.run(go())


@pytest.fixture(params=sorted(BACKENDS))
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    name = request.param
    ns = uuid.uuid4().hex[:8]
    flows = tmp_path / "flows.py"
    flows.write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    env = BACKENDS[name](request.getfixturevalue, ns)
    env["FLOWCRAFT_FLOWS"] = f"{flows}:flows"
    made = Fleet(name, env, tmp_path)
    if name == "kafka":  # the keyspace's tables and the topics, as the README's worker does
        made.adapter_call(lambda adapter: _kafka_topology(adapter))
    yield made
    process = made.worker_process
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


async def _kafka_topology(adapter: Any) -> None:
    await adapter.create_schema()
    await adapter.create_topics()


def test_the_fleet_commands(fleet: Fleet) -> None:
    early = fleet.cli("start", "pair")
    assert early.exit_code == 0, early.output
    early_run = early.stdout.strip()
    listed = fleet.cli("runs", "--json")
    if fleet.name in LISTS_ACTIVE_RUNS:
        assert listed.exit_code == 0, listed.output
        assert {"runId": early_run, "status": "running", "blueprintId": "pair"}.items() <= next(
            row for row in json.loads(listed.stdout) if row["runId"] == early_run
        ).items()
    else:
        assert listed.exit_code == 2
        assert "cannot list its active runs" in listed.output

    log = fleet.start_worker()
    assert fleet.json("wait", early_run, "--timeout", "60")["status"] == "completed"
    done = fleet.json("start", "pair", "--wait", "--timeout", "60")
    assert (done["status"], done["context"]["_outputs.b"]) == ("completed", 21)
    assert fleet.json("status", done["runId"])["status"] == "completed"

    paused = fleet.cli("start", "approval").stdout.strip()
    fleet.until(lambda: fleet.json("status", paused)["status"] == "awaiting", "the pause")
    assert fleet.json("cancel", paused)["status"] == "cancelled"
    assert fleet.json("status", paused)["status"] == "cancelled"

    fleet.adapter_call(lambda adapter: adapter.enqueue_raw(b"not a job"))
    fleet.until(lambda: len(fleet.json("dead-letters", "list")) == 1, "the dead letter")
    requeued = fleet.cli("dead-letters", "requeue", "--json")
    if fleet.name in REQUEUES_DEAD_LETTERS:
        assert json.loads(requeued.stdout) == {"requeued": 1}
        # back on the queue, no better a job: the worker parks it again
        fleet.until(lambda: len(fleet.json("dead-letters", "list")) == 1, "the dead letter")
        purged = fleet.json("dead-letters", "purge", "--yes")
        assert purged == {"purged": 1}
        assert fleet.json("dead-letters", "list") == []
    else:
        assert requeued.exit_code == 2
        assert "cannot requeue its dead letters" in requeued.output
        purged_result = fleet.cli("dead-letters", "purge", "--yes")
        assert purged_result.exit_code == 2
        assert "cannot purge its dead letters" in purged_result.output

    assert fleet.worker_process is not None
    fleet.worker_process.send_signal(signal.SIGTERM)
    assert fleet.worker_process.wait(timeout=60) == 0, log.read_text()
    assert "(exit 0)" in log.read_text()
