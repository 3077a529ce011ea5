"""RabbitMQ: Debian's ``rabbitmq-server``, a private node per run.

The node has its own name, data, log and config locations, its own Erlang
distribution port and its own ``epmd`` (on a private port, started first in
the same process group), so it neither clashes with a system RabbitMQ nor
leaves an ``epmd`` daemon behind. ``HOME`` is the run directory, so the
Erlang cookie is private too. ``guest``/``guest`` works because clients come
from loopback.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import ClassVar

from flowcraft_backends._install import apt_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import Service, run_async

__all__ = ["RabbitmqService"]

_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class RabbitmqService(Service):
    name = "rabbitmq"
    docker_image = "rabbitmq:3.13.7"
    docker_port = 5672
    ready_timeout: ClassVar[float] = 90.0
    install_hint = "apt rabbitmq-server"

    def is_installed(self) -> bool:
        return _SERVER.is_file()

    def install(self) -> None:
        apt_install("rabbitmq-server")

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        dist_port = self.reserve_port(workdir, "dist")
        epmd_port = self.reserve_port(workdir, "epmd")
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{port}\n"
            "loopback_users.guest = true\n"
            "log.console = true\n"
            "log.file = false\n"
            "vm_memory_high_watermark.relative = 0.6\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq-env.conf").write_text("")
        env = {
            "HOME": str(workdir),
            "RABBITMQ_NODENAME": f"flowcraft{port}@localhost",
            "RABBITMQ_USE_LONGNAME": "false",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
            "RABBITMQ_LOGS": "-",
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        # epmd first, in this process group; wait until it answers, then exec the node
        # with -start_epmd false so Erlang never spawns a detached epmd of its own.
        script = (
            f"epmd -port {epmd_port} -address 127.0.0.1 & "
            f"for i in $(seq 100); do epmd -port {epmd_port} -names >/dev/null 2>&1 && break; "
            "sleep 0.1; done; "
            f"exec {shlex.quote(str(_SERVER))}"
        )
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-start_epmd false"
        return self.spawn(["/bin/sh", "-c", script], port, workdir, env=env)

    def local_url(self, port: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    def probe(self, url: str) -> None:
        import aio_pika

        async def declare() -> None:
            connection = await aio_pika.connect(url, timeout=5)
            try:
                channel = await connection.channel()
                queue = await channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.delete()
            finally:
                await connection.close()

        run_async(declare)
