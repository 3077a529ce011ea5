"""Resolve Maven artifacts and their runtime classpath, cached across checkouts.

A JVM server is described by a few Maven coordinates (for Kafka, ``kafka_2.13``
plus a logging binding). :func:`resolve_classpath` writes a throw-away POM that
depends on them, runs ``mvn dependency:build-classpath`` (through the user's own
Maven settings, so mirrors and proxies apply), copies every jar in classpath
order into the cache and records the order. Later calls find the cache and run
no Maven at all.

Cache layout (``FLOWCRAFT_BACKENDS_MAVEN_DIR``, else
``~/.cache/flowcraft-backends/maven``; shared by every checkout, since released
artifacts never change)::

    <name>-<hash>/pom.xml        the generated POM (the hash is of its text)
    <name>-<hash>/lib/*.jar      the jars
    <name>-<hash>/classpath.txt  jar names in classpath order

An entry is filled in a staging directory and renamed into place whole, so a
reader never sees half of one; two runs that miss at once both resolve, and the
first rename wins (the launcher's install lock makes that rare).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from flowcraft_backends._install import InstallError, apt_install, run_checked

__all__ = [
    "DEPENDENCY_PLUGIN",
    "Artifact",
    "cached_classpath",
    "ensure_maven",
    "maven_dir",
    "render_pom",
    "resolve_classpath",
]

_log = logging.getLogger(__name__)

#: Pinned so that resolution does not depend on the Maven version's default binding.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

_CLASSPATH_FILE = "classpath.txt"


@dataclass(frozen=True)
class Artifact:
    """One Maven dependency: ``group:artifact:version``, without its ``exclusions``."""

    group: str
    artifact: str
    version: str
    exclusions: tuple[str, ...] = ()  # "group:artifact" pairs left out of the tree

    def __str__(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"


def maven_dir() -> Path:
    """The shared artifact cache (created on first use)."""
    configured = os.environ.get("FLOWCRAFT_BACKENDS_MAVEN_DIR")
    root = (
        Path(configured) if configured else Path.home() / ".cache" / "flowcraft-backends" / "maven"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def render_pom(name: str, artifacts: Sequence[Artifact]) -> str:
    """A POM whose runtime dependencies are ``artifacts``."""

    def exclusion(pair: str) -> str:
        group, _, artifact = pair.partition(":")
        return (
            "<exclusion>"
            f"<groupId>{escape(group)}</groupId><artifactId>{escape(artifact)}</artifactId>"
            "</exclusion>"
        )

    deps = []
    for art in artifacts:
        exclusions = "".join(exclusion(pair) for pair in art.exclusions)
        deps.append(
            "    <dependency>"
            f"<groupId>{escape(art.group)}</groupId>"
            f"<artifactId>{escape(art.artifact)}</artifactId>"
            f"<version>{escape(art.version)}</version>"
            + (f"<exclusions>{exclusions}</exclusions>" if exclusions else "")
            + "</dependency>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>flowcraft.backends</groupId>\n"
        f"  <artifactId>{escape(name)}-runtime</artifactId>\n"
        "  <version>0</version>\n"
        "  <packaging>pom</packaging>\n"
        "  <dependencies>\n"
        f"{''.join(deps)}"
        "  </dependencies>\n"
        "</project>\n"
    )


def _key(name: str, pom: str) -> str:
    return f"{name}-{hashlib.sha256(pom.encode()).hexdigest()[:12]}"


def _read_cache(directory: Path) -> list[Path] | None:
    record = directory / _CLASSPATH_FILE
    try:
        names = record.read_text().split()
    except OSError:
        return None
    jars = [directory / "lib" / jar for jar in names]
    if not jars or not all(jar.is_file() for jar in jars):
        return None
    return jars


def cached_classpath(name: str, artifacts: Sequence[Artifact]) -> list[Path] | None:
    """The cached classpath for ``artifacts``, or None if it is not (wholly) cached."""
    pom = render_pom(name, artifacts)
    return _read_cache(maven_dir() / _key(name, pom))


def ensure_maven() -> str:
    """The ``mvn`` launcher, installed from Debian (package ``maven``) if missing."""
    found = shutil.which("mvn")
    if found is None:
        _log.info("no mvn on PATH; installing Debian's maven")
        apt_install("maven")
        found = shutil.which("mvn")
        if found is None:
            raise InstallError("installed maven but still no mvn on PATH")
    return found


def _copy_in_order(jars: Sequence[Path], lib: Path) -> list[str]:
    """Copy ``jars`` into ``lib``; return their names there, in order (renamed on clashes)."""
    lib.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for index, jar in enumerate(jars):
        target = jar.name
        if target in names:
            target = f"{index:03d}-{jar.name}"
        shutil.copy2(jar, lib / target)
        names.append(target)
    return names


def resolve_classpath(
    name: str, artifacts: Sequence[Artifact], *, timeout: float = 1200
) -> list[Path]:
    """The runtime classpath of ``artifacts``: cached jars, resolved by Maven on a miss.

    Args:
        name: A label for the cache entry (``"kafka"``).
        artifacts: The direct dependencies; their runtime dependencies come along.
        timeout: Seconds Maven may take (a cold download is tens of megabytes).

    Raises:
        InstallError: if Maven is missing and cannot be installed, or fails.
    """
    pom = render_pom(name, artifacts)
    key = _key(name, pom)
    final = maven_dir() / key
    cached = _read_cache(final)
    if cached is not None:
        return cached
    mvn = ensure_maven()
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=maven_dir()))
    try:
        (staging / "pom.xml").write_text(pom)
        listing = staging / "maven-classpath.txt"
        _log.info("resolving %s with Maven", ", ".join(str(a) for a in artifacts))
        run_checked(
            [
                mvn,
                "-B",
                "-q",
                "-f",
                str(staging / "pom.xml"),
                f"{DEPENDENCY_PLUGIN}:build-classpath",
                f"-Dmdep.outputFile={listing}",
                "-Dmdep.includeScope=runtime",
            ],
            timeout=timeout,
        )
        entries = [Path(p) for p in listing.read_text().strip().split(os.pathsep) if p]
        if not entries:
            raise InstallError(f"Maven resolved no jars for {name}")
        names = _copy_in_order(entries, staging / "lib")
        (staging / _CLASSPATH_FILE).write_text("".join(f"{n}\n" for n in names))
        if _read_cache(final) is None:  # absent, or damaged (jars removed by hand)
            shutil.rmtree(final, ignore_errors=True)
            try:
                staging.rename(final)
            except OSError:  # another run put a complete entry there first
                _log.debug("%s was filled by another run", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    jars = _read_cache(final)
    if jars is None:
        raise InstallError(f"the classpath cache {final} is incomplete after resolving")
    _log.info("%s: %d jars cached in %s", name, len(jars), final)
    return jars
