"""Google Cloud Pub/Sub: Google's own emulator, from the machine's google-cloud-cli.

Local process: ``cloud-pubsub-emulator --host=127.0.0.1 --port=PORT`` (a shell script
that execs Java; ready in about 3 s). Messages live in memory only, so a restart
starts empty. Docker: the pinned ``google-cloud-cli:<version>-emulators`` image.

Clients find the emulator through ``PUBSUB_EMULATOR_HOST`` (``host:port``), which
``RunningService.extra`` carries; ``url`` is the same ``host:port``.

:class:`GoogleEmulatorService` and the helpers here are shared with the Firestore
service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flowcraft_backends._install import InstallError, apt_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import Service

if TYPE_CHECKING:
    import grpc  # type: ignore[import-untyped]  # no stubs in the dev group
    from testcontainers.core.container import DockerContainer

__all__ = [
    "EMULATORS_IMAGE",
    "GoogleEmulatorService",
    "PubSubService",
    "emulator_path",
    "insecure_channel",
    "install_emulator",
    "sdk_root",
]

_log = logging.getLogger(__name__)

#: Google's image with every emulator, pinned to the google-cloud-cli verified here.
EMULATORS_IMAGE = "gcr.io/google.com/cloudsdktool/google-cloud-cli:528.0.0-emulators"

#: A project name for probes; the emulator accepts any project.
_PROBE_PROJECT = "projects/flowcraft-probe"


def sdk_root() -> Path | None:
    """The google-cloud-cli installation directory, if one is found.

    Looks at ``CLOUDSDK_ROOT_DIR``, then the ``gcloud`` on ``PATH`` (``<root>/bin/gcloud``),
    then Debian's location ``/usr/lib/google-cloud-sdk``.
    """
    candidates: list[Path] = []
    configured = os.environ.get("CLOUDSDK_ROOT_DIR")
    if configured:
        candidates.append(Path(configured))
    gcloud = shutil.which("gcloud")
    if gcloud is not None:
        candidates.append(Path(gcloud).resolve().parent.parent)
    candidates.append(Path("/usr/lib/google-cloud-sdk"))
    for candidate in candidates:
        if (candidate / "platform").is_dir():
            return candidate
    return None


def emulator_path(relative: Path) -> Path | None:
    """The emulator launcher at ``relative`` inside the SDK, if it is installed."""
    root = sdk_root()
    if root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


def install_emulator(component: str) -> None:
    """Install Java if missing and the emulator's Debian package ``component``.

    The emulators come as google-cloud-cli component packages from Google's own apt
    repository; where that repository is not configured the error says what to do.
    """
    if shutil.which("java") is None:
        apt_install("default-jre-headless")
    try:
        apt_install(component)
    except InstallError as exc:
        raise InstallError(
            f"could not install {component} (a google-cloud-cli component from Google's "
            "apt repository). Install google-cloud-cli with its emulator components, run "
            "Docker, or point the service's FLOWCRAFT_TEST_*_URL at a running emulator. "
            f"apt said: {exc}"
        ) from exc


@contextlib.contextmanager
def insecure_channel(url: str) -> Iterator[grpc.Channel]:
    """A plaintext gRPC channel to an emulator at ``host:port``, closed on exit."""
    import grpc

    channel = grpc.insecure_channel(url)
    try:
        yield channel
    finally:
        channel.close()


class GoogleEmulatorService(Service):
    """What Google's emulators share: found in the SDK, host:port URLs, Docker command.

    Abstract (``probe`` is left to each emulator), so the registry skips it.
    """

    docker_image = EMULATORS_IMAGE
    #: The emulator's launcher, relative to the SDK root.
    script: ClassVar[Path]
    #: The Debian package (google-cloud-cli component) that brings it.
    component: ClassVar[str]
    #: The variable Google's client libraries read (``host:port``).
    emulator_host_var: ClassVar[str]
    #: ``gcloud`` arguments that start the emulator inside the image, without the address.
    gcloud_start: ClassVar[str]

    def command(self, script: Path, port: int) -> list[str]:
        """The command line that serves on ``127.0.0.1:port``, given the launcher's path."""
        return [str(script), "--host=127.0.0.1", f"--port={port}"]

    def is_installed(self) -> bool:
        return shutil.which("java") is not None and emulator_path(self.script) is not None

    def install(self) -> None:
        install_emulator(self.component)

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        script = emulator_path(self.script)
        if script is None:
            raise InstallError(f"{self.component} is not installed")
        return self.spawn(self.command(script, port), port, workdir)

    def local_url(self, port: int) -> str:
        return f"127.0.0.1:{port}"

    def extra_for(self, url: str) -> dict[str, str]:
        return {self.emulator_host_var: url}

    def docker_container(self) -> DockerContainer:
        command = f"gcloud {self.gcloud_start} --host-port=0.0.0.0:{self.docker_port}"
        return super().docker_container().with_command(command)


class PubSubService(GoogleEmulatorService):
    """The Pub/Sub emulator on ``127.0.0.1:PORT``."""

    name = "pubsub"
    docker_port = 8085
    ready_timeout = 60.0
    install_hint = "apt google-cloud-cli-pubsub-emulator (Google's repository) + Java"
    script = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
    component = "google-cloud-cli-pubsub-emulator"
    emulator_host_var = "PUBSUB_EMULATOR_HOST"
    gcloud_start = "beta emulators pubsub start"

    def probe(self, url: str) -> None:
        from google.pubsub_v1.services.publisher import PublisherClient
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        with insecure_channel(url) as channel:
            client = PublisherClient(transport=PublisherGrpcTransport(channel=channel))
            # One call, no retries (wait_ready retries); any answer, even empty, means ready.
            client.list_topics(project=_PROBE_PROJECT, retry=None, timeout=2.0)
