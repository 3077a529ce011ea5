"""The service model: how one backend is found, started, probed and stopped.

Resolve order (see ``BACKENDS.md``), owned here once for every service:

1. the environment variable ``FLOWCRAFT_TEST_<NAME>_URL``: used as it is;
2. a reachable Docker engine: the service's pinned image via testcontainers
   (disable with ``FLOWCRAFT_BACKENDS_DOCKER=0``);
3. a local process on a free 127.0.0.1 port in 20000-32000, installed first
   if missing.

A service module subclasses :class:`Service` and writes the primitives:
``is_installed``, ``install``, ``start_local``, ``local_url`` and ``probe``
(one real client operation). The base class does the ordering, the waiting,
the logging and the clean-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from flowcraft_backends._install import InstallError, install_lock, tools_dir, work_dir
from flowcraft_backends._process import LocalProcess, free_port, reap_orphans

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "BackendUnavailable",
    "How",
    "RestartUnsupported",
    "RunningService",
    "Service",
    "ToolService",
    "docker_available",
    "run_async",
]

_log = logging.getLogger(__name__)

How = Literal["env", "docker", "local"]
T = TypeVar("T")


class BackendUnavailable(RuntimeError):
    """No way to get this backend: env var unset, no Docker, local start failed."""


class RestartUnsupported(RuntimeError):
    """``restart()`` on a backend the launcher does not own (env) or cannot keep the port of."""


def run_async(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running event loop."""

    async def main() -> T:
        return await factory()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, main()).result()


def _docker_socket_answers() -> bool:
    """Cheap pre-check (the Docker client leaks a socket when no engine is there)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    parsed = urllib.parse.urlparse(host)
    if parsed.scheme in {"unix", ""}:
        path = parsed.path or "/var/run/docker.sock"
        if not os.path.exists(path):
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            return sock.connect_ex(path) == 0
    if parsed.scheme in {"tcp", "http", "https"} and parsed.hostname:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            return sock.connect_ex((parsed.hostname, parsed.port or 2375)) == 0
    return True  # ssh:// and others: let the Docker client decide


def _port_open(url: str) -> bool:
    """Cheap TCP check before a client probe (keeps client libraries' retry noise down).

    True when the URL has no host and port to check.
    """
    parsed = urllib.parse.urlparse(url)
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        return True
    if not host or not port:
        return True
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@functools.cache
def docker_available() -> bool:
    """True if a Docker engine answers a ping (and ``FLOWCRAFT_BACKENDS_DOCKER`` is not 0)."""
    if os.environ.get("FLOWCRAFT_BACKENDS_DOCKER", "").strip().lower() in {"0", "false", "no"}:
        return False
    if not _docker_socket_answers():
        return False
    try:
        import docker  # type: ignore[import-untyped]  # testcontainers depends on it

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:  # any failure means "no usable engine"
        _log.debug("no Docker engine: %s", exc)
        return False


@functools.cache
def _reap_once() -> None:
    """Once per process: stop servers that killed test sessions left running."""
    killed = reap_orphans(work_dir() / "run")
    if killed:
        _log.warning("stopped %d process(es) left behind by earlier runs", killed)


class _Controller(ABC):
    """What a RunningService can do to the server behind it."""

    log_path: Path | None = None

    @abstractmethod
    def restart(self, timeout: float) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...


@dataclass(frozen=True, eq=False)
class RunningService:
    """A backend that answers, and how to reach it.

    Attributes:
        name: Service name, for example ``"redis"``.
        url: The primary address a client needs (the same value the
            ``FLOWCRAFT_TEST_<NAME>_URL`` variable would hold).
        extra: Other facts: keys, connection strings, secondary ports.
        how: ``"env"`` (given by the environment), ``"docker"`` or ``"local"``.
        env_var: The environment variable that points tests at this backend.
    """

    name: str
    url: str
    extra: dict[str, str]
    how: How
    env_var: str
    _controller: _Controller | None = field(default=None, repr=False, compare=False)

    @property
    def log_path(self) -> Path | None:
        """The server's log file, for local processes."""
        return self._controller.log_path if self._controller else None

    def restart(self, timeout: float = 120.0) -> None:
        """Stop the server and start it again on the same port; block until it answers.

        Supported for ``how == "local"`` only. Data survives if the service
        persists it (Redis keeps its append-only file, PostgreSQL its cluster).

        Raises:
            RestartUnsupported: for ``"env"`` (not ours to restart) and
                ``"docker"`` (a restarted container may get another host port).
        """
        if self.how == "env":
            raise RestartUnsupported(
                f"{self.name} comes from {self.env_var}; the launcher does not own it "
                "and cannot restart it"
            )
        if self._controller is None:
            raise RestartUnsupported(f"{self.name} ({self.how}) has no controller")
        self._controller.restart(timeout)

    def stop(self) -> None:
        """Stop the server (a no-op for ``"env"`` backends, which are not ours)."""
        if self._controller is not None:
            self._controller.stop()

    def exports(self) -> dict[str, str]:
        """Environment variables that point another process at this backend."""
        return {self.env_var: self.url}


class _LocalController(_Controller):
    def __init__(self, service: Service, port: int, run_dir: Path, process: LocalProcess) -> None:
        self.service = service
        self.port = port
        self.run_dir = run_dir
        self.process: LocalProcess | None = process
        self.log_path = process.log_path

    def restart(self, timeout: float) -> None:
        if self.process is not None:
            self.process.stop()
        self.process = None
        self.process = self.service.launch(self.port, self.run_dir, timeout)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
        if os.environ.get("FLOWCRAFT_BACKENDS_KEEP", "") != "1":
            self.service.cleanup_local(self.run_dir)
            shutil.rmtree(self.run_dir, ignore_errors=True)


class _DockerController(_Controller):
    def __init__(self, container: DockerContainer) -> None:
        self.container = container

    def restart(self, timeout: float) -> None:
        raise RestartUnsupported(
            "restart() is not supported for Docker backends: a restarted container may be "
            "given a different host port. Use the local launcher (FLOWCRAFT_BACKENDS_DOCKER=0)."
        )

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop()


class Service(ABC):
    """One kind of backend. Subclass it once per service module.

    Class attributes to set:
        name: Short name (``"redis"``); the fixture is ``<name>_service``.
        docker_image: Pinned image for testcontainers and docker-compose.
        docker_port: The port the image listens on.
        ready_timeout: Seconds a local or Docker start may take to answer.
        stop_signal: Signal that shuts the local server down cleanly.
    """

    name: ClassVar[str]
    docker_image: ClassVar[str]
    docker_port: ClassVar[int]
    ready_timeout: ClassVar[float] = 60.0
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    #: How to install, shown by ``flowcraft-backends list`` (for example ``apt redis-server``).
    install_hint: ClassVar[str] = ""

    @property
    def env_var(self) -> str:
        """Environment variable holding an address to use as it is."""
        return f"FLOWCRAFT_TEST_{self.name.upper()}_URL"

    # -- primitives a service writes -------------------------------------------------

    @abstractmethod
    def is_installed(self) -> bool:
        """True if everything the local process needs is present."""

    @abstractmethod
    def install(self) -> None:
        """Install what the local process needs (called under a lock, only if missing)."""

    @abstractmethod
    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        """Start the server on ``127.0.0.1:port``, keeping its data in ``workdir``.

        Called again with the same arguments by ``restart()``. Use :meth:`spawn`.
        """

    @abstractmethod
    def local_url(self, port: int) -> str:
        """The URL of a local server listening on ``port``."""

    @abstractmethod
    def probe(self, url: str) -> None:
        """One real client operation against ``url``; raise if it does not work."""

    def extra_for(self, url: str) -> dict[str, str]:
        """Extra facts for a backend at ``url`` (keys, connection strings)."""
        return {}

    def cleanup_local(self, workdir: Path) -> None:  # noqa: B027 - optional hook
        """Remove what a stopped local server kept outside ``workdir`` (default: nothing)."""

    def docker_container(self) -> DockerContainer:
        """The testcontainers container to start (override to add env or a command)."""
        from testcontainers.core.container import DockerContainer

        return DockerContainer(self.docker_image).with_exposed_ports(self.docker_port)

    def docker_url(self, host: str, port: int) -> str:
        """The URL of the container's service at ``host:port`` (defaults to local_url's form)."""
        return self.local_url(port).replace("127.0.0.1", host, 1)

    # -- helpers for service modules -------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        port: int,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
    ) -> LocalProcess:
        """Start ``argv`` in its own process group, logging to ``logs/<name>-<port>.log``."""
        log_path = work_dir() / "logs" / f"{self.name}-{port}.log"
        return LocalProcess(
            self.name,
            argv,
            log_path,
            env=env,
            cwd=workdir,
            user=user,
            stop_signal=self.stop_signal,
        )

    @staticmethod
    def reserve_port(workdir: Path, label: str) -> int:
        """A second port for this server (e.g. a cluster port), stable across restarts."""
        record = workdir / "ports.json"
        ports: dict[str, int] = json.loads(record.read_text()) if record.exists() else {}
        if label not in ports:
            ports[label] = free_port()
            record.write_text(json.dumps(ports))
        return ports[label]

    # -- orchestration (not overridden) ---------------------------------------------

    def ensure_installed(self) -> None:
        """Install if missing, once, under a lock shared by concurrent runs."""
        if self.is_installed():
            return
        with install_lock(self.name):
            if self.is_installed():
                return
            started = time.monotonic()
            _log.info("installing %s", self.name)
            self.install()
            if not self.is_installed():
                raise InstallError(f"{self.name}: install finished but the server is still missing")
            _log.info("installed %s in %.1f s", self.name, time.monotonic() - started)

    def wait_ready(
        self, url: str, timeout: float | None = None, process: LocalProcess | None = None
    ) -> None:
        """Block until :meth:`probe` succeeds; fail early if ``process`` exits.

        Raises:
            BackendUnavailable: on timeout or when the process died.
        """
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last: BaseException | None = None
        delay = 0.05
        while True:
            if process is not None and not process.running():
                raise BackendUnavailable(f"{self.name} did not start: {process.describe_exit()}")
            try:
                if not _port_open(url):
                    raise ConnectionRefusedError(f"nothing listens at {url}")
                self.probe(url)
            except Exception as exc:  # every failure means "not ready yet"
                last = exc
            else:
                return
            if time.monotonic() >= deadline:
                detail = f"\n{process.describe_exit()}" if process else ""
                raise BackendUnavailable(
                    f"{self.name} at {url} did not answer within {limit:.0f} s "
                    f"(last error: {last!r}){detail}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def launch(self, port: int, workdir: Path, timeout: float | None = None) -> LocalProcess:
        """Start the local server on ``port`` and wait until it answers."""
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            process = self.start_local(port, workdir)
        except (InstallError, OSError) as exc:
            raise BackendUnavailable(f"{self.name} could not be started: {exc}") from exc
        try:
            self.wait_ready(self.local_url(port), timeout, process)
        except BaseException:
            process.stop()
            raise
        return process

    def from_env(self, url: str) -> RunningService:
        """A RunningService for an address given in the environment (checked with a probe)."""
        configured = os.environ.get("FLOWCRAFT_BACKENDS_ENV_TIMEOUT")
        self.wait_ready(url, timeout=float(configured) if configured else self.ready_timeout)
        return RunningService(self.name, url, self.extra_for(url), "env", self.env_var)

    def start_docker(self) -> RunningService:
        """Start the pinned image with testcontainers and wait until it answers."""
        container = self.docker_container()
        container.start()
        try:
            host = container.get_container_host_ip()
            port = int(container.get_exposed_port(self.docker_port))
            url = self.docker_url(host, port)
            self.wait_ready(url)
        except BaseException:
            with contextlib.suppress(Exception):
                container.stop()
            raise
        return RunningService(
            self.name,
            url,
            self.extra_for(url),
            "docker",
            self.env_var,
            _DockerController(container),
        )

    def start_local_service(self, attempts: int = 2) -> RunningService:
        """Install if needed, then start a local server on a free port."""
        _reap_once()
        try:
            self.ensure_installed()
        except InstallError as exc:
            raise BackendUnavailable(f"{self.name}: could not install: {exc}") from exc
        error: BackendUnavailable | None = None
        for _ in range(attempts):
            port = free_port()
            run_dir = work_dir() / "run" / f"{self.name}-{port}"
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.monotonic()
            try:
                process = self.launch(port, run_dir)
            except BackendUnavailable as exc:  # e.g. the port was taken meanwhile
                _log.warning("%s failed to start on port %d: %s", self.name, port, exc)
                shutil.rmtree(run_dir, ignore_errors=True)
                error = exc
                continue
            url = self.local_url(port)
            _log.info("%s ready at %s in %.1f s", self.name, url, time.monotonic() - started)
            controller = _LocalController(self, port, run_dir, process)
            return RunningService(
                self.name, url, self.extra_for(url), "local", self.env_var, controller
            )
        assert error is not None
        raise error

    def resolve(self) -> RunningService:
        """Environment variable, else Docker, else a local process.

        Raises:
            BackendUnavailable: with every reason, when none of the three works.
        """
        url = os.environ.get(self.env_var)
        if url:
            _log.info("%s: using %s from %s", self.name, url, self.env_var)
            return self.from_env(url)
        if docker_available():
            _log.info("%s: starting %s with testcontainers", self.name, self.docker_image)
            try:
                return self.start_docker()
            except Exception as exc:
                raise BackendUnavailable(
                    f"{self.name}: Docker is reachable but {self.docker_image} did not start: {exc}"
                ) from exc
        return self.start_local_service()

    def describe(self) -> dict[str, Any]:
        """Facts for ``flowcraft-backends list``."""
        return {
            "name": self.name,
            "env_var": self.env_var,
            "docker_image": self.docker_image,
            "installed": self.is_installed(),
            "install": self.install_hint,
        }


class ToolService(Service):
    """A service whose server is installed under ``tools/<name>/`` (npm prefix, venv).

    Set ``tool_executable`` to the server's path relative to that directory.
    """

    tool_executable: ClassVar[str]

    def executable(self) -> Path:
        """Absolute path of the installed server executable."""
        return tools_dir(self.name) / self.tool_executable

    def is_installed(self) -> bool:
        return self.executable().is_file()


def wait_for(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it is truthy (for tests driving subprocesses, which write
    files or answer commands); fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
