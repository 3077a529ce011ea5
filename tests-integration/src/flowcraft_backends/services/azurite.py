"""Azurite (queue service only): npm ``azurite``, in memory.

Installed with npm under ``tools/azurite``. 3.35.0 is the newest release that
runs on Node 20 (3.36 needs Node 21, 3.37 Node 22). ``extra`` carries the
well-known development account and a ready connection string.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flowcraft_backends._install import npm_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import ToolService

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["AzuriteService"]

AZURITE_VERSION = "3.35.0"
ACCOUNT_NAME = "devstoreaccount1"
# Azurite's documented, public development key (not a secret).
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_FLAGS = ["--skipApiVersionCheck", "--loose", "--disableTelemetry", "--inMemoryPersistence"]


class AzuriteService(ToolService):
    name = "azurite"
    docker_image = f"mcr.microsoft.com/azure-storage/azurite:{AZURITE_VERSION}"
    docker_port = 10001
    ready_timeout: ClassVar[float] = 30.0
    install_hint = f"npm azurite@{AZURITE_VERSION}"
    tool_executable = "node_modules/.bin/azurite-queue"

    def install(self) -> None:
        npm_install("azurite", f"azurite@{AZURITE_VERSION}")

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        argv = [
            str(self.executable()),
            "--queueHost", "127.0.0.1",
            "--queuePort", str(port),
            *_FLAGS,
        ]  # fmt: skip
        return self.spawn(argv, port, workdir)

    def local_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/{ACCOUNT_NAME}"

    def docker_container(self) -> DockerContainer:
        any_interface = "0.0.0.0"  # noqa: S104 - inside the container; Docker maps the port
        command = ["azurite-queue", "--queueHost", any_interface, "--queuePort", "10001", *_FLAGS]
        return super().docker_container().with_command(command)

    def docker_url(self, host: str, port: int) -> str:
        return f"http://{host}:{port}/{ACCOUNT_NAME}"

    def extra_for(self, url: str) -> dict[str, str]:
        return {
            "account_name": ACCOUNT_NAME,
            "account_key": ACCOUNT_KEY,
            "connection_string": (
                f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};"
                f"AccountKey={ACCOUNT_KEY};QueueEndpoint={url};"
            ),
        }

    def probe(self, url: str) -> None:
        from azure.storage.queue import QueueServiceClient

        connection_string = self.extra_for(url)["connection_string"]
        with QueueServiceClient.from_connection_string(connection_string) as client:
            next(iter(client.list_queues(results_per_page=1)), None)
