"""The README's quick start, run as written: its three files, a worker process and the
client, against the companion Worker on Miniflare (address and secret from the
environment)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from flowcraft_cloudflare import WorkerSettings

README = Path(__file__).parents[1] / "README.md"


def quick_start_files() -> dict[str, str]:
    """``name.py`` -> code, for each "`name.py`" paragraph followed by a python block."""
    text = README.read_text(encoding="utf-8")
    found = dict(re.findall(r"^`(\w+\.py)`[^\n]*\n\n```python\n(.*?)```", text, re.M | re.S))
    assert set(found) == {"orders.py", "worker.py", "client.py"}, sorted(found)
    return found


def test_quick_start_runs_as_written(settings: WorkerSettings, tmp_path: Path) -> None:
    for name, code in quick_start_files().items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    env = {
        **os.environ,
        "FLOWCRAFT_WORKER_URL": settings.url,
        "FLOWCRAFT_SECRET": settings.secret.get_secret_value(),
        "FLOWCRAFT_NAMESPACE": f"readme-{uuid.uuid4().hex[:10]}",
    }
    worker = subprocess.Popen([sys.executable, "worker.py"], cwd=tmp_path, env=env)
    try:
        client = subprocess.run(
            [sys.executable, "client.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "completed ann: 3 items"
    finally:
        worker.send_signal(signal.SIGTERM)
        exit_code = worker.wait(timeout=60)
    assert exit_code == 0, "the worker did not stop gracefully on SIGTERM"
