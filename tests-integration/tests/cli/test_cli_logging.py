"""One logging hierarchy, quiet in libraries, informative in the CLI, and no credential
in any of it: a worker at ``--log-level debug`` on a Redis user with a password runs a
run and logs under ``flowcraft.*`` only, never the password; a worker whose password
is refused says so without it; a library that logs a warning prints nothing until the
application configures logging."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from flowcraft_backends import RunningService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

FLOWCRAFT = str(Path(sys.executable).with_name("flowcraft"))

FLOWS = """
    from flowcraft import Flow

    flow = Flow("pair").node("a", lambda ctx: 20).node("b", lambda ctx: ctx.input + 1)
    flow.edge("a", "b")
"""

RECORD = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ [A-Z]+ ([\w.]+): ", re.M)


@pytest.fixture
def redis_user(redis_service: RunningService) -> Iterator[tuple[str, str]]:
    """A Redis ACL user with a password of its own: (URL with the password, password)."""
    name, password = f"cli-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    admin = redis.Redis.from_url(redis_service.url)
    admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"],
                      channels=["*"], commands=["+@all"])  # fmt: skip
    parts = urllib.parse.urlsplit(redis_service.url)
    netloc = f"{name}:{password}@{parts.hostname}:{parts.port}"
    try:
        yield urllib.parse.urlunsplit(parts._replace(netloc=netloc)), password
    finally:
        admin.acl_deluser(name)
        admin.close()


def test_debug_logs_are_flowcraft_s_and_hold_no_password(
    redis_user: tuple[str, str], tmp_path: Path
) -> None:
    url, password = redis_user
    flows = tmp_path / "flows.py"
    flows.write_text(textwrap.dedent(FLOWS), encoding="utf-8")
    ns = uuid.uuid4().hex[:8]
    env = {
        **os.environ,
        "FLOWCRAFT_ADAPTER": "bullmq",
        "FLOWCRAFT_BULLMQ_URL": url,
        "FLOWCRAFT_BULLMQ_KEY_PREFIX": f"log{ns}:",
        "FLOWCRAFT_BULLMQ_QUEUE_NAME": f"log{ns}",
        "FLOWCRAFT_FLOWS": f"{flows}:flow",
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([FLOWCRAFT, "worker", "--log-level", "debug"], env=env,
                                  stderr=out)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "worker started" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        done = subprocess.run(
            [FLOWCRAFT, "start", "pair", "--wait", "--json", "--timeout", "60"],
            env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["context"]["_outputs.b"] == 21
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    text = log.read_text()
    assert password not in text + done.stdout + done.stderr
    names = set(RECORD.findall(text))
    assert "flowcraft.worker" in names
    assert all(n == "flowcraft" or n.startswith("flowcraft.") for n in names), names

    # the same user with a wrong password: refused, and said so without the password
    wrong = url.replace(password, "wrong-" + password)
    refused = subprocess.run(
        [FLOWCRAFT, "worker", "--log-level", "debug", "--grace", "1"],
        env={**env, "FLOWCRAFT_BULLMQ_URL": wrong}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert password not in refused.stderr
    assert "***@" in refused.stderr


def test_a_library_is_quiet_until_logging_is_configured() -> None:
    code = (
        "import logging, flowcraft_bullmq\n"
        "logging.getLogger('flowcraft.bullmq').warning('a warning from the library')\n"
        "logging.basicConfig()\n"
        "logging.getLogger('flowcraft.bullmq').warning('configured now')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "a warning from the library" not in done.stderr
    assert "configured now" in done.stderr


def test_every_logger_is_under_flowcraft() -> None:
    """Every module's logger, adapters' included, is ``flowcraft`` or under it (a new
    module with its package's own name would escape the CLI's handler and levels)."""
    root = Path(__file__).parents[3] / "packages"
    call = re.compile(r"getLogger\(([^()]*)\)")
    wrong = []
    for path in sorted(root.glob("*/src/**/*.py")):
        core = path.is_relative_to(root / "flowcraft-core")
        for argument in call.findall(path.read_text(encoding="utf-8")):
            name = argument.strip()
            ok = re.fullmatch(r'f?"flowcraft(\.[\w.{}]+)?"', name) is not None or (
                core and name in ("__name__", "name")  # flowcraft.*, or the CLI's own loop
            )
            if not ok:
                wrong.append(f"{path.relative_to(root)}: getLogger({name})")
    assert not wrong, wrong
