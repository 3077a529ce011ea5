"""Where the launcher keeps its files, and cached, lock-protected installs.

Layout under the work directory (``FLOWCRAFT_BACKENDS_DIR``, else
``.flowcraft-backends/`` at the repository root, else
``~/.cache/flowcraft-backends``)::

    tools/<name>/   installed software (npm prefixes, venvs, downloads); kept
    run/<name>-<port>/   data of one running server; removed when it stops
    logs/<name>-<port>.log   server output; kept for post-mortems
    locks/<name>.lock   serialises installs across concurrent test runs
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "InstallError",
    "apt_install",
    "install_lock",
    "npm_install",
    "run_checked",
    "tools_dir",
    "venv_install",
    "work_dir",
]

_log = logging.getLogger(__name__)

_apt_updated = False


class InstallError(RuntimeError):
    """An install step failed; the message carries the command's output."""


def work_dir() -> Path:
    """The launcher's root directory (created on first use)."""
    configured = os.environ.get("FLOWCRAFT_BACKENDS_DIR")
    if configured:
        root = Path(configured)
    else:
        root = Path.home() / ".cache" / "flowcraft-backends"
        for parent in [Path.cwd(), *Path.cwd().parents]:
            if (parent / "uv.lock").is_file() and (parent / "tests-integration").is_dir():
                root = parent / ".flowcraft-backends"
                break
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def tools_dir(name: str) -> Path:
    """Directory for one service's installed software."""
    path = work_dir() / "tools" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def install_lock(name: str) -> Iterator[None]:
    """Hold an exclusive file lock so concurrent runs do not install twice at once."""
    lock_dir = work_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with (lock_dir / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_checked(
    argv: Sequence[str],
    *,
    timeout: float = 900,
    env: dict[str, str] | None = None,
    user: str | None = None,
) -> str:
    """Run a setup command; raise :class:`InstallError` with its output if it fails."""
    _log.info("running: %s", " ".join(argv))
    full_env = {**os.environ, **(env or {})}
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            user=user,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{' '.join(argv)} failed: {exc}") from exc
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        raise InstallError(f"{' '.join(argv)} exited with {done.returncode}:\n{output}")
    return done.stdout


def apt_install(*packages: str) -> None:
    """Install Debian packages (root only). Runs ``apt-get update`` once if needed.

    Services are never started by the install: this relies on the machine's
    ``policy-rc.d`` (exit 101), and adds ``RUNLEVEL=1`` as a second guard.
    """
    global _apt_updated
    if os.geteuid() != 0:
        raise InstallError(
            f"installing {' '.join(packages)} needs root; install them yourself "
            "or point the FLOWCRAFT_TEST_*_URL variables at running servers"
        )
    env = {"DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    with install_lock("apt"):
        try:
            run_checked(argv, env=env)
        except InstallError:
            if _apt_updated:
                raise
            _apt_updated = True
            run_checked(["apt-get", "update"], env=env)
            run_checked(argv, env=env)


def npm_install(name: str, *specs: str) -> Path:
    """Install npm packages into ``tools/<name>`` and return its ``node_modules/.bin``."""
    prefix = tools_dir(name)
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is not on PATH; install Node.js (Debian: nodejs npm)")
    run_checked(
        [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--omit=dev", *specs]
    )
    return prefix / "node_modules" / ".bin"


def venv_install(name: str, *requirements: str) -> Path:
    """Create a dedicated venv under ``tools/<name>/venv``; return its ``bin`` directory."""
    venv = tools_dir(name) / "venv"
    uv = shutil.which("uv")
    if uv is not None:
        run_checked([uv, "venv", "--allow-existing", "--python", sys.executable, str(venv)])
        run_checked([uv, "pip", "install", "--python", str(venv / "bin" / "python"), *requirements])
    else:
        run_checked([sys.executable, "-m", "venv", str(venv)])
        run_checked([str(venv / "bin" / "python"), "-m", "pip", "install", *requirements])
    return venv / "bin"
