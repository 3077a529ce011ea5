"""moto: ``moto_server`` from PyPI ``moto[server]`` (SQS, DynamoDB), in its own venv.

The venv lives under ``tools/moto/venv`` so the test environment's
dependencies stay untouched. Any credentials and region work; ``extra``
carries the ones clients should use. Reset all state with
``POST {url}/moto-api/reset``.

Both the local server and the container run through ``_moto_atomic.py``, which
applies DynamoDB requests one at a time: moto itself has no locking, so concurrent
updates of one item can be lost, unlike real DynamoDB (see that module).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flowcraft_backends._install import venv_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import ToolService

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["MotoService"]

_WRAPPER = Path(__file__).with_name("_moto_atomic.py")

MOTO_REQUIREMENT = "moto[server]==5.2.5"
REGION = "us-east-1"
ACCESS_KEY = "testing"  # any value works with moto


class MotoService(ToolService):
    name = "moto"
    docker_image = "motoserver/moto:5.2.5"
    docker_port = 5000
    ready_timeout: ClassVar[float] = 30.0
    install_hint = f"venv {MOTO_REQUIREMENT}"
    tool_executable = "venv/bin/moto_server"

    def install(self) -> None:
        venv_install("moto", MOTO_REQUIREMENT)

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        python = self.executable().parent / "python"
        argv = [str(python), str(_WRAPPER), "-H", "127.0.0.1", "-p", str(port)]
        return self.spawn(argv, port, workdir)

    def docker_container(self) -> DockerContainer:
        # The image's own Python (moto installed) runs the same wrapper.
        any_interface = "0.0.0.0"  # noqa: S104 - inside the container; Docker maps the port
        return (
            super()
            .docker_container()
            .with_volume_mapping(str(_WRAPPER), "/flowcraft/moto_atomic.py", "ro")
            .with_kwargs(entrypoint=["python3", "/flowcraft/moto_atomic.py"])
            .with_command(["-H", any_interface, "-p", str(self.docker_port)])
        )

    def local_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def extra_for(self, url: str) -> dict[str, str]:
        return {
            "region": REGION,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": ACCESS_KEY,
            "reset_url": f"{url.rstrip('/')}/moto-api/reset",
        }

    def probe(self, url: str) -> None:
        import boto3

        client = boto3.client(
            "dynamodb",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=ACCESS_KEY,
        )
        client.list_tables(Limit=1)
