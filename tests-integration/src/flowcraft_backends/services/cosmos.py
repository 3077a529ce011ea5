"""Cosmos DB (NoSQL API): npm ``@vercel/cosmosdb-server`` over plain HTTP.

Clients need the public emulator key (``extra["key"]``) and
``enable_endpoint_discovery=False`` (the server advertises no regions).
Known gaps (BACKENDS.md): reading a missing item answers 500, not 404; only
create works in batches; TTL is not enforced. Docker users get Microsoft's
Linux emulator (the "vnext" image, which serves HTTP).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flowcraft_backends._install import npm_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import ToolService

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["CosmosService"]

COSMOS_SERVER_VERSION = "1.0.1"
# The Cosmos DB emulator's documented, public key (not a secret).
EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)


class CosmosService(ToolService):
    name = "cosmos"
    docker_image = "mcr.microsoft.com/cosmosdb/linux/azure-cosmos-emulator:vnext-preview"
    docker_port = 8081
    ready_timeout: ClassVar[float] = 30.0
    install_hint = f"npm @vercel/cosmosdb-server@{COSMOS_SERVER_VERSION}"
    tool_executable = "node_modules/.bin/cosmosdb-server"

    def install(self) -> None:
        npm_install("cosmos", f"@vercel/cosmosdb-server@{COSMOS_SERVER_VERSION}")

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        argv = [str(self.executable()), "--no-ssl", "--host", "127.0.0.1", "--port", str(port)]
        return self.spawn(argv, port, workdir)

    def local_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/"

    def docker_container(self) -> DockerContainer:
        return super().docker_container().with_env("PROTOCOL", "http")

    def extra_for(self, url: str) -> dict[str, str]:
        return {"key": EMULATOR_KEY}

    def probe(self, url: str) -> None:
        from azure.cosmos import CosmosClient

        client = CosmosClient(url, credential=EMULATOR_KEY, enable_endpoint_discovery=False)
        list(client.list_databases(max_item_count=1))
