"""The fleet commands end to end on every adapter, one parametrised scenario on each
real backend: a run started before any
worker is listed by ``runs`` (where the adapter keeps an index of active runs); a
``flowcraft worker`` subprocess finishes it (``wait``), runs ``start --wait``, and a
run paused at a wait node is cancelled (``status``, ``cancel``); a body that is no
job is dead-lettered, then ``dead-letters requeue`` puts it back (it is parked
again) and ``purge`` deletes it, or both say clearly that the queue cannot; SIGTERM
stops the worker (exit 0). The operator commands run in-process (click's runner) to
keep the scenario cheap; the worker is a real process. Then each adapter README's quick
start, run as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import typing
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from flowcraft.adapters import build_adapter, load_adapter
from flowcraft.cli import main
from flowcraft.distributed import BaseDistributedAdapter
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


def _bullmq(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    return {
        "FLOWCRAFT_BULLMQ_URL": fixture("redis_service").url,
        "FLOWCRAFT_BULLMQ_KEY_PREFIX": f"cli{ns}:",
        "FLOWCRAFT_BULLMQ_QUEUE_NAME": f"cli{ns}",
    }


def _sqs(fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    from flowcraft_sqs import AwsClients, AwsSettings, create_queues, create_table

    moto = fixture("moto_service")
    extra = moto.extra
    aws = AwsSettings(
        endpoint_url=moto.url,
        region_name=extra["region"],
        aws_access_key_id=extra["aws_access_key_id"],
        aws_secret_access_key=extra["aws_secret_access_key"],
    )

    async def topology() -> str:
        clients = AwsClients(aws)
        try:
            await create_table(clients, f"cli{ns}")
            return (await create_queues(clients, f"cli{ns}")).queue_url
        finally:
            clients.close()

    return {
        "AWS_ACCESS_KEY_ID": extra["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": extra["aws_secret_access_key"],
        "FLOWCRAFT_SQS_ENDPOINT_URL": moto.url,
        "FLOWCRAFT_SQS_REGION_NAME": extra["region"],
        "FLOWCRAFT_SQS_QUEUE_URL": asyncio.run(topology()),
        "FLOWCRAFT_SQS_TABLE_NAME": f"cli{ns}",  # long polls of 20 s, the default
    }


BACKENDS = {
    "bullmq": _bullmq,
    "sqs": _sqs,
    "rabbitmq": _rabbitmq,
    "gcp": _gcp,
    "azure": _azure,
    "kafka": _kafka,
    "cloudflare": _cloudflare,
}


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
            adapter, _, _ = build_adapter(self.name, RuntimeOptions())
            try:
                return await call(adapter)
            finally:
                await adapter.aclose()

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)  # clients made lazily read the emulators' variables
        try:
            return asyncio.run(go())
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def overrides(self, hook: str) -> bool:
        """Whether the adapter implements the base's optional ``hook``."""
        adapter_class = typing.get_type_hints(load_adapter(self.name).build)["return"]
        return getattr(adapter_class, hook) is not getattr(BaseDistributedAdapter, hook)


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
        made.adapter_call(_kafka_topology)
    if name == "azure":  # the database, container and queues a worker makes at its start
        made.adapter_call(lambda adapter: adapter.create_resources())
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
    if fleet.overrides("active_runs"):
        assert listed.exit_code == 0, listed.output
        assert {"runId": early_run, "status": "running", "blueprintId": "pair"}.items() <= next(
            row for row in json.loads(listed.stdout) if row["runId"] == early_run
        ).items()
    else:
        assert listed.exit_code == 2
        assert "cannot list its active runs" in listed.output

    if fleet.overrides("queue_depth"):  # the run's first job waits in the queue
        assert fleet.adapter_call(lambda adapter: adapter.queue_depth()) >= 1

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
    if fleet.overrides("requeue_dead_letters"):
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

    # idle now, with a receive in flight (SQS: a 20 s long poll): SIGTERM stops it
    # promptly, past the base's short grace for a receive, without waiting for the poll
    assert fleet.worker_process is not None
    began = time.monotonic()
    fleet.worker_process.send_signal(signal.SIGTERM)
    assert fleet.worker_process.wait(timeout=60) == 0, log.read_text()
    print(f"{fleet.name}: the worker exited {time.monotonic() - began:.2f} s after SIGTERM")
    assert "SIGTERM: stopping" in log.read_text()
    assert "(exit 0)" in log.read_text()


# --------------------------------------------------------------------------- READMEs

README_FILE = re.compile(r"^`(\w+\.py)`[^\n]*\n\n```python\n(.*?)```", re.M | re.S)
README_SHELL = re.compile(
    r"^```bash\n(# (once|every terminal|terminal 1|terminal 2)[^\n]*\n.*?)```", re.M | re.S
)


def _readme_env(name: str, fixture: Callable[[str], Any], ns: str) -> dict[str, str]:
    """The variables a README's reader sets: the backend's addresses (the CLI's own
    ``FLOWCRAFT_<NAME>_*`` settings), and what keeps this test's keys apart."""
    if name == "bullmq":
        redis_url = fixture("redis_service").url.rsplit("/", 1)[0]
        return {"FLOWCRAFT_BULLMQ_URL": f"{redis_url}/9"}  # a database of its own
    if name == "sqs":
        moto = fixture("moto_service")
        return {
            "FLOWCRAFT_SQS_ENDPOINT_URL": moto.url,
            "FLOWCRAFT_SQS_REGION_NAME": moto.extra["region"],
            "FLOWCRAFT_SQS_TABLE_NAME": f"readme{ns}",
            "AWS_ACCESS_KEY_ID": moto.extra["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": moto.extra["aws_secret_access_key"],
        }
    return BACKENDS[name](fixture, ns)


README_OUTPUT = {
    "bullmq": "completed 84 EUR",
    "sqs": "completed 28.5 EUR",
    "rabbitmq": "completed ann: needs a human",
    "gcp": "completed ann: needs a human",
    "azure": "completed ann: needs a human",
    "kafka": "completed ann: needs a human",
    "cloudflare": "completed ann: 3 items",
}


@pytest.mark.parametrize("name", sorted(README_OUTPUT))
def test_the_readme_quick_start_runs_as_written(
    name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The adapter README's quick start: its files written out, its shell blocks run as
    they are (``every terminal`` before each), a worker in terminal 1 and the run in
    terminal 2, with only the backend's addresses in the environment."""
    text = (Path(__file__).parents[3] / f"packages/flowcraft-{name}/README.md").read_text()
    quick = text[text.index("## Quick start") :]
    quick = quick[: quick.index("\n## ", 5)]
    for file_name, code in README_FILE.findall(quick):
        (tmp_path / file_name).write_text(code, encoding="utf-8")
    shells = {tag: block for block, tag in README_SHELL.findall(quick)}
    assert {"terminal 1", "terminal 2"} <= set(shells), shells
    before = shells.get("every terminal", "")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # python and flowcraft
        **_readme_env(name, request.getfixturevalue, uuid.uuid4().hex[:8]),
    }

    def run_block(tag: str) -> str:
        done = subprocess.run(
            ["bash", "-ec", before + shells[tag]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    if "once" in shells:
        run_block("once")
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            ["bash", "-ec", before + shells["terminal 1"]],
            cwd=tmp_path,
            env=env,
            stderr=out,
            start_new_session=True,  # SIGTERM to the shell and its worker
        )
    try:
        deadline = time.monotonic() + 90
        while "worker started" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert run_block("terminal 2").strip() == README_OUTPUT[name]
        os.killpg(worker.pid, signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
