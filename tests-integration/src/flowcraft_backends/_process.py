"""Local server processes: free ports, process groups, log files, clean shutdown.

Every process started here runs in its own session (so its own process group),
writes stdout and stderr to a log file, and is registered so that it is stopped
(SIGTERM, then SIGKILL, to the whole group) when the interpreter exits, even
after a failed test run or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "PORT_RANGE",
    "LocalProcess",
    "free_port",
    "install_sigterm_handler",
    "port_is_free",
    "reap_orphans",
    "stop_all",
    "tail",
]

_log = logging.getLogger(__name__)

#: Ports chosen for local servers: below the kernel's ephemeral range (32768-60999).
PORT_RANGE = (20000, 32000)

#: Environment variable marking every process of a local server with its run directory.
TAG_VAR = "FLOWCRAFT_BACKENDS_RUN_DIR"
#: File in the run directory holding the pid of the process that started the server.
OWNER_FILE = "owner.pid"

_live: set[LocalProcess] = set()
_live_lock = threading.Lock()
_taken: set[int] = set()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Return True if nothing listens on ``host:port`` and it can be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) != 0


def free_port(host: str = "127.0.0.1") -> int:
    """Pick a free port in :data:`PORT_RANGE`, never one this process handed out before."""
    low, high = PORT_RANGE
    for _ in range(500):
        port = random.randint(low, high)
        with _live_lock:
            if port in _taken:
                continue
            _taken.add(port)
        if port_is_free(port, host):
            return port
    raise RuntimeError(f"no free port found in {low}-{high} on {host}")


def tail(path: Path, lines: int = 30) -> str:
    """Return the last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class LocalProcess:
    """A server process in its own process group, logging to a file.

    Args:
        name: Label used in log messages.
        argv: The command line.
        log_path: File that receives stdout and stderr (appended to).
        env: Extra environment variables, added to the current environment.
        cwd: Working directory.
        user: Run as this user (for servers that refuse to run as root).
        stop_signal: Signal asking the server to shut down (SIGKILL follows).
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        if cwd is not None:
            # Tag the process tree with its run directory and record who owns it, so a
            # later run can find and stop what a killed session left behind.
            full_env[TAG_VAR] = str(cwd)
            (cwd / OWNER_FILE).write_text(str(os.getpid()))
        _log.info("starting %s: %s (log: %s)", name, " ".join(self.argv), log_path)
        with log_path.open("ab") as log_file:
            log_file.write(f"\n=== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
            log_file.flush()
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                user=user,
                start_new_session=True,
            )
        self.pgid = self.popen.pid  # a new session: the leader's pid is the group id
        with _live_lock:
            _live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        """True while the leader process has not exited."""
        return self.popen.poll() is None

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the whole process group: the stop signal, then SIGKILL after ``timeout``."""
        with _live_lock:
            _live.discard(self)
        if self.running() or self._group_alive():
            _log.info("stopping %s (pgid %d)", self.name, self.pgid)
            self._signal_group(self.stop_signal)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.popen.poll()
                if not self._group_alive():
                    break
                time.sleep(0.05)
            else:
                _log.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
                self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        # Reap any stragglers left in the group (children re-parented to init).
        self._signal_group(signal.SIGKILL)

    def describe_exit(self) -> str:
        """Why the process is gone (exit code) plus the tail of its log."""
        code = self.popen.poll()
        state = "still running" if code is None else f"exited with code {code}"
        return f"{self.name} {state}; last lines of {self.log_path}:\n{tail(self.log_path)}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (Linux /proc): a zombie, exited but not reaped yet, is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()  # the name in parentheses may hold spaces
    return bool(fields) and fields[0] not in ("Z", "X")


def processes_of(run_dir: Path) -> list[int]:
    """Pids that belong to the server of ``run_dir`` (Linux /proc).

    A process belongs to it if its environment carries the run-directory tag or
    its working directory is inside the run directory (some servers, such as
    Redis, overwrite their environment block to set their process title).
    """
    tag = str(run_dir)
    needle = f"{TAG_VAR}={tag}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if cwd == tag or cwd.startswith(tag + os.sep) or needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def reap_orphans(run_root: Path) -> int:
    """Stop servers whose owning process died without stopping them (e.g. SIGKILL).

    Looks at each ``run_root/*/owner.pid``; if that pid is gone, kills every
    process tagged with the run directory and removes the directory.

    Returns:
        How many processes were killed.
    """
    killed = 0
    if not run_root.is_dir():
        return 0
    for run_dir in run_root.iterdir():
        owner_file = run_dir / OWNER_FILE
        try:
            owner = int(owner_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        for pid in processes_of(run_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        _log.warning("removed %s, left behind by dead process %d", run_dir, owner)
        shutil.rmtree(run_dir, ignore_errors=True)
    return killed


def stop_all() -> None:
    """Stop every local process that is still registered (runs at interpreter exit)."""
    with _live_lock:
        live = list(_live)
    for proc in live:
        try:
            proc.stop(timeout=10.0)
        except OSError as exc:  # pragma: no cover - best effort at exit
            if exc.errno != errno.ESRCH:
                _log.warning("could not stop %s: %s", proc.name, exc)


def install_sigterm_handler() -> None:
    """Turn SIGTERM into SystemExit so atexit handlers (and finalizers) run."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


atexit.register(stop_all)
