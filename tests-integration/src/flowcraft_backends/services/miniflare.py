"""Cloudflare Workers, offline: Miniflare (real workerd) running flowcraft's test worker.

The worker and its Node launcher live in ``flowcraft_backends/miniflare/``. The worker
owns a Durable Object ``Counter`` (``POST /incr?key=``, ``POST /setnx?key=``,
``GET /get?key=``, atomic per key), a KV namespace (``PUT/GET /kv?key=``) and a queue
(``POST /queue/send``); ``GET /health`` answers after a round trip through a Durable
Object.

Workers shipped inside flowcraft packages (``PACKAGED_WORKERS``: flowcraft-cloudflare's
companion Worker) run beside the test worker when their package is installed: the
launcher gets ``--worker CONFIG.json`` for each, and their routes (``*/flowcraft/*``)
take the requests they claim; everything else still reaches the test worker.

Local process: ``node launcher.mjs --port PORT`` through Miniflare's Node API with
``cf: false`` (nothing is fetched from the network), using the miniflare version pinned
in that folder's ``package.json`` (4.20260426.x, the last line that runs on Node 20),
installed with ``npm ci`` from the committed lock file into the launcher's tools
directory. Durable Object and KV data are kept in the run directory, so ``restart()``
keeps them; ``stop()`` removes them. Docker: a pinned ``node:20`` image runs the same
launcher from the folder, mounted read-only.

``url`` is ``http://host:port``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from flowcraft_backends._install import InstallError, apt_install, run_checked, tools_dir
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import Service

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "LAUNCHER_DIR",
    "PACKAGED_WORKERS",
    "MiniflareService",
    "packaged_worker_configs",
    "pinned_version",
]

_log = logging.getLogger(__name__)

#: The launcher, the test worker and the pinned package.json / package-lock.json.
LAUNCHER_DIR = Path(__file__).resolve().parent.parent / "miniflare"
_NODE_MAJOR = 20
_CONTAINER_SOURCE = "/flowcraft-miniflare"
_CONTAINER_WORKERS = "/flowcraft-workers"

#: Workers shipped inside flowcraft packages: (import name, Miniflare config in it).
PACKAGED_WORKERS: tuple[tuple[str, str], ...] = (("flowcraft_cloudflare", "worker/miniflare.json"),)


def packaged_worker_configs() -> list[Path]:
    """The Miniflare configs of the packaged workers whose package is installed."""
    found: list[Path] = []
    for module, relative in PACKAGED_WORKERS:
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            config = Path(location) / relative
            if config.is_file():
                found.append(config)
                break
    return found


def pinned_version() -> str:
    """The miniflare version pinned in the launcher's ``package.json``."""
    manifest = json.loads((LAUNCHER_DIR / "package.json").read_text())
    version: str = manifest["dependencies"]["miniflare"]
    return version


def _node_major() -> int | None:
    """The major version of the ``node`` on ``PATH``, or None without one."""
    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.match(r"v(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def _modules_dir() -> Path:
    return tools_dir("miniflare") / "node_modules"


def _installed_version() -> str | None:
    manifest = _modules_dir() / "miniflare" / "package.json"
    try:
        version: str = json.loads(manifest.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return version


class MiniflareService(Service):
    """Miniflare with the test worker on ``http://127.0.0.1:PORT``."""

    name = "miniflare"
    docker_image = "node:20.20.2-bookworm-slim"
    docker_port = 8787
    # A Docker start runs npm ci inside the container first; a local start takes ~1 s.
    ready_timeout = 180.0
    install_hint = f"npm ci (miniflare {pinned_version()}) on Node {_NODE_MAJOR}+"

    def is_installed(self) -> bool:
        major = _node_major()
        return (
            major is not None and major >= _NODE_MAJOR and _installed_version() == pinned_version()
        )

    def install(self) -> None:
        if shutil.which("node") is None or shutil.which("npm") is None:
            apt_install("nodejs", "npm")
        major = _node_major()
        if major is None or major < _NODE_MAJOR:
            raise InstallError(
                f"miniflare {pinned_version()} needs Node {_NODE_MAJOR}+, found "
                f"{'no node' if major is None else f'Node {major}'}; install a newer Node.js"
            )
        npm = shutil.which("npm")
        if npm is None:
            raise InstallError("npm is not on PATH; install it with Node.js")
        prefix = tools_dir("miniflare")
        for manifest in ("package.json", "package-lock.json"):
            shutil.copyfile(LAUNCHER_DIR / manifest, prefix / manifest)
        # --ignore-scripts: workerd's binary comes in its platform package; its postinstall
        # and sharp's only check or rebuild things the launcher does not need.
        run_checked(
            [npm, "ci", "--prefix", str(prefix), "--ignore-scripts", "--no-audit", "--no-fund"]
        )

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        argv = [
            "node",
            str(LAUNCHER_DIR / "launcher.mjs"),
            "--host=127.0.0.1",
            f"--port={port}",
            f"--modules={_modules_dir()}",
            f"--persist={workdir / 'data'}",
            *(f"--worker={config}" for config in packaged_worker_configs()),
        ]
        # Miniflare keeps a scratch directory in TMPDIR and removes it only in the
        # background on exit; inside the run directory it goes when the service stops.
        scratch = workdir / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        return self.spawn(argv, port, workdir, env={"TMPDIR": str(scratch)})

    def local_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def probe(self, url: str) -> None:
        answer = httpx.get(f"{url}/health", timeout=5.0)
        answer.raise_for_status()
        if answer.json() != {"ok": True}:
            raise RuntimeError(f"unexpected health answer from {url}: {answer.text}")
        for config in packaged_worker_configs():
            health = json.loads(config.read_text()).get("health")
            if health:
                httpx.get(f"{url}{health}", timeout=5.0).raise_for_status()

    def docker_container(self) -> DockerContainer:
        configs = packaged_worker_configs()
        workers = "".join(
            f" --worker={_CONTAINER_WORKERS}/{i}/{config.name}" for i, config in enumerate(configs)
        )
        script = (
            f"mkdir -p /app && cp -r {_CONTAINER_SOURCE}/. /app && cd /app && "
            "rm -rf node_modules && "
            "npm ci --ignore-scripts --no-audit --no-fund && "
            f"exec node launcher.mjs --host=0.0.0.0 --port={self.docker_port}{workers}"
        )
        container = (
            super()
            .docker_container()
            .with_volume_mapping(str(LAUNCHER_DIR), _CONTAINER_SOURCE, "ro")
            .with_command(["sh", "-c", script])
        )
        for i, config in enumerate(configs):
            container = container.with_volume_mapping(
                str(config.parent), f"{_CONTAINER_WORKERS}/{i}", "ro"
            )
        return container
