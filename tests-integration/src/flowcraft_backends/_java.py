"""Find a Java runtime and start JVM servers through an argument file.

The JVM servers (Kafka, Cassandra) run from jars that :mod:`flowcraft_backends._maven`
resolves. Their long option lists and classpaths go into a ``java @argfile`` file in
the server's work directory, which keeps the command line short (and readable in the
launcher's log) and leaves the exact JVM invocation on disk for post-mortems.

The runtime is ``$JAVA_HOME/bin/java`` when ``JAVA_HOME`` is set, else ``java`` on
``PATH``; if neither exists, Debian's ``openjdk-17-jre-headless`` is installed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import socket
import subprocess
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from flowcraft_backends._install import InstallError, apt_install
from flowcraft_backends._maven import Artifact, cached_classpath, resolve_classpath
from flowcraft_backends._service import Service

__all__ = [
    "JAVA_APT_PACKAGE",
    "JvmService",
    "ensure_java",
    "find_java",
    "java_major_version",
    "quote_argfile_token",
    "split_host_port",
    "write_argfile",
]

_log = logging.getLogger(__name__)

#: The Debian package installed when no Java runtime is found.
JAVA_APT_PACKAGE = "openjdk-17-jre-headless"

_VERSION_RE = re.compile(r'version "(?P<version>[^"]+)"')


def find_java() -> Path | None:
    """The ``java`` launcher: ``$JAVA_HOME/bin/java``, else the one on ``PATH``."""
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        _log.warning("JAVA_HOME=%s has no bin/java; looking on PATH", home)
    found = shutil.which("java")
    return Path(found) if found else None


@functools.cache
def java_major_version(java: Path) -> int:
    """The feature version of ``java`` (8 for ``1.8.0_x``, 17 for ``17.0.15``).

    Raises:
        InstallError: if ``java -version`` fails or prints no version.
    """
    try:
        done = subprocess.run(
            [str(java), "-version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{java} -version failed: {exc}") from exc
    match = _VERSION_RE.search(done.stderr + done.stdout)
    if done.returncode != 0 or match is None:
        raise InstallError(f"{java} -version printed no version: {done.stderr.strip()!r}")
    parts = match.group("version").split(".")
    major = parts[1] if parts[0] == "1" and len(parts) > 1 else parts[0]
    digits = re.match(r"\d+", major)
    if digits is None:
        raise InstallError(f"cannot read the Java version from {match.group(0)!r}")
    return int(digits.group(0))


def ensure_java(minimum: int) -> Path:
    """A Java runtime of at least version ``minimum``, installed from Debian if none exists.

    Raises:
        InstallError: if no runtime can be installed, or the one found is too old.
    """
    java = find_java()
    if java is None:
        _log.info("no Java runtime found; installing %s", JAVA_APT_PACKAGE)
        apt_install(JAVA_APT_PACKAGE)
        java = find_java()
        if java is None:
            raise InstallError(f"installed {JAVA_APT_PACKAGE} but still no java on PATH")
    major = java_major_version(java)
    if major < minimum:
        raise InstallError(
            f"{java} is Java {major}; Java {minimum} or newer is needed "
            f"(install {JAVA_APT_PACKAGE} and set JAVA_HOME)"
        )
    return java


def quote_argfile_token(token: str) -> str:
    """Quote one token for a ``java @argfile`` (double quotes, backslash escapes)."""
    escaped = token.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def write_argfile(path: Path, options: Sequence[str], classpath: Sequence[Path]) -> Path:
    """Write JVM ``options`` and ``-cp classpath`` to ``path``, one token a line.

    Returns ``path``; start the JVM as ``[java, f"@{path}", main_class, *args]``.
    """
    tokens = [*options, "-cp", os.pathsep.join(str(jar) for jar in classpath)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{quote_argfile_token(token)}\n" for token in tokens))
    return path


def split_host_port(url: str, default_port: int) -> tuple[str, int]:
    """The first ``host:port`` of ``url`` (a comma-separated list is allowed) as a pair.

    ``[v6]:port`` loses its brackets; a bare host gets ``default_port``.
    """
    first = url.split(",", 1)[0].strip()
    host, sep, port = first.rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        return first.strip("[]"), default_port
    return host.strip("[]"), int(port)


class JvmService(Service):
    """A service whose local process is a JVM run from Maven Central's jars.

    Subclasses set ``artifacts`` (the direct dependencies) and ``java_minimum``;
    installing means a Java runtime plus the cached classpath of ``artifacts``.
    Their ``url`` is ``host:port``; :meth:`probe` tries a plain TCP connection
    before :meth:`client_probe`, so that the client library does not log a
    connection error (with a traceback) on every poll while the JVM starts.
    """

    artifacts: ClassVar[tuple[Artifact, ...]]
    java_minimum: ClassVar[int] = 17

    def is_installed(self) -> bool:
        java = find_java()
        if java is None or cached_classpath(self.name, self.artifacts) is None:
            return False
        try:
            return java_major_version(java) >= self.java_minimum
        except InstallError:
            return False

    def install(self) -> None:
        ensure_java(self.java_minimum)
        resolve_classpath(self.name, self.artifacts)

    def jvm(self) -> tuple[Path, int, list[Path]]:
        """The ``java`` launcher, its major version and the classpath to run."""
        java = ensure_java(self.java_minimum)
        return java, java_major_version(java), resolve_classpath(self.name, self.artifacts)

    @abstractmethod
    def client_probe(self, url: str) -> None:
        """One real client operation against ``url``; raise if it does not work."""

    def probe(self, url: str) -> None:
        with socket.create_connection(split_host_port(url, self.docker_port), timeout=2.0):
            pass
        self.client_probe(url)
