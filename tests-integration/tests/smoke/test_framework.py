"""The launcher itself: resolve order, failing (never skipping), process groups, CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flowcraft_backends import BackendUnavailable, RestartUnsupported, RunningService, services
from flowcraft_backends._process import (
    PORT_RANGE,
    LocalProcess,
    free_port,
    pid_alive,
    processes_of,
)
from flowcraft_backends.cli import main


def test_free_port_is_below_the_ephemeral_range() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    assert all(PORT_RANGE[0] <= port <= PORT_RANGE[1] < 32768 for port in ports)


def test_stop_ends_the_whole_process_group(tmp_path: Path) -> None:
    proc = LocalProcess(
        "sleepers", ["sh", "-c", "sleep 300 & sleep 300 & wait"], tmp_path / "log", cwd=tmp_path
    )
    deadline = time.monotonic() + 5
    while len(processes_of(tmp_path)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    members = processes_of(tmp_path)
    assert len(members) == 3  # the shell and both sleeps

    proc.stop(timeout=5)

    assert not any(pid_alive(pid) for pid in members)


def test_unknown_service_names_the_missing_module() -> None:
    with pytest.raises(BackendUnavailable, match=r"services/nosuch\.py"):
        services.get("nosuch")


def test_env_url_is_used_as_is(
    redis_service: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWCRAFT_TEST_REDIS_URL", redis_service.url)

    given = services.get("redis").resolve()

    assert (given.how, given.url) == ("env", redis_service.url)
    with pytest.raises(RestartUnsupported, match="FLOWCRAFT_TEST_REDIS_URL"):
        given.restart()
    given.stop()  # not ours: a no-op
    assert services.get("redis").probe(redis_service.url) is None


def test_unreachable_backend_fails_the_test_instead_of_skipping(tmp_path: Path) -> None:
    (tmp_path / "test_needs_redis.py").write_text(
        textwrap.dedent(
            """
            def test_uses_redis(redis_service):
                raise AssertionError("must not run")
            """
        )
    )
    closed_port = free_port()
    env = {
        **os.environ,
        "FLOWCRAFT_TEST_REDIS_URL": f"redis://127.0.0.1:{closed_port}/0",
        "FLOWCRAFT_BACKENDS_ENV_TIMEOUT": "1",
    }
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)]

    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)

    assert run.returncode == 1, run.stdout
    assert "1 error" in run.stdout
    assert "skipped" not in run.stdout
    assert "backend 'redis' is unavailable" in run.stdout
    assert f"127.0.0.1:{closed_port}" in run.stdout

    deselect = [*argv, "-m", "not integration"]
    run = subprocess.run(
        deselect, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert "1 deselected" in run.stdout


def test_cli_list_names_every_expected_service(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(services.EXPECTED) <= listed
