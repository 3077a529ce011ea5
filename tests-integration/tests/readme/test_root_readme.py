"""The root README as a newcomer uses it: every code block runs as written, or names
the test that runs it; the first command installs only flowcraft-core (no cloud SDK,
no dev tools) and runs the example."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
FIRST_COMMAND = (
    "pip install uv && uv run --package flowcraft-core flowcraft run examples/order_pipeline.py"
)
# Shell blocks this test does not run, by their first line, and where each is checked.
WALKTHROUGH = "tests-integration/tests/cli/test_cli_walkthrough.py"
ELSEWHERE = {
    "bash scripts/test": "scripts/test (it is the suite this test belongs to)",
    "pip install flowcraft-core": "scripts/check_dists.py (CI job dists: what PyPI receives)",
    "uv run flowcraft-backends up redis": WALKTHROUGH,
    "uv run flowcraft start supplier-fan-out": WALKTHROUGH,
}
# What the in-memory example must never pull in.
HEAVY = ("boto3", "google", "azure", "confluent_kafka", "cassandra", "mypy", "ruff", "pytest")


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


@pytest.mark.parametrize("code", blocks("python"), ids=lambda code: code.splitlines()[0])
def test_python_block_runs_as_written(code: str, tmp_path: Path) -> None:
    """Pasted into a file and run: exits 0 and prints what its `print(...)  # ...` says."""
    script = tmp_path / "block.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for expected in re.findall(r"^print\(.*\)  # (\S+)", code, re.MULTILINE):
        assert expected in result.stdout, (expected, result.stdout)


def test_every_shell_block_is_run_here_or_by_a_named_test() -> None:
    shell = blocks("bash")
    assert shell[0].strip() == FIRST_COMMAND  # "The two commands": the first one
    assert shell[1].strip() == "bash scripts/test"  # and the second
    for body in shell[1:]:
        first = body.strip().splitlines()[0]
        where = next((w for key, w in ELSEWHERE.items() if first.startswith(key)), None)
        assert where is not None, f"README shell block run nowhere: {first!r}"
        assert (ROOT / where.split()[0]).exists(), where


def test_first_command_installs_only_the_core_and_runs_the_example(tmp_path: Path) -> None:
    """Into an empty environment, as on a fresh machine (uv already installed)."""
    uv = shutil.which("uv")
    assert uv is not None, "uv runs this suite (scripts/test installs it)"
    command = FIRST_COMMAND.split(" && ", 1)[1].split()
    assert command[0] == "uv"
    venv = tmp_path / "venv"
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(venv), "UV_LOCKED": "1"}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        [uv, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["notification"]["to"] == "ada.park@example.com"

    installed = {
        p.name.split("-")[0].lower() for p in venv.glob("lib/python*/site-packages/*.dist-info")
    }
    assert "flowcraft_core" in installed
    assert not [name for name in installed if name.startswith(HEAVY)], installed
    size = sum(p.stat().st_size for p in venv.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 30 * 2**20, f"the in-memory example installed {size / 2**20:.1f} MiB"
