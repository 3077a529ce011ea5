"""The README's quick start, run as written: its three files, a worker process and the
client, against the real Kafka, Cassandra and Redis (addresses from the environment)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from flowcraft_backends import RunningService

README = Path(__file__).parents[1] / "README.md"


def quick_start_files() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    found = dict(re.findall(r"^`(\w+\.py)`[^\n]*\n\n```python\n(.*?)```", text, re.M | re.S))
    assert set(found) == {"orders.py", "worker.py", "client.py"}, sorted(found)
    return found


def test_quick_start_runs_as_written(
    kafka_service: RunningService,
    cassandra_service: RunningService,
    redis_service: RunningService,
    keyspace: str,
    tmp_path: Path,
) -> None:
    for name, code in quick_start_files().items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP": kafka_service.url,
        "CASSANDRA_ADDRESS": cassandra_service.url,
        "REDIS_URL": redis_service.url,
        "FLOWCRAFT_TOPIC": f"fc-readme-{uuid.uuid4().hex[:10]}",
        "FLOWCRAFT_KEYSPACE": keyspace,  # the test run's: dropped at the end
    }
    worker = subprocess.Popen([sys.executable, "worker.py"], cwd=tmp_path, env=env)
    try:
        client = subprocess.run(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "completed ann: needs a human"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, "the worker did not stop gracefully on SIGTERM"
