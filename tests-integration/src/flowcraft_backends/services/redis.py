"""Redis: Debian's ``redis-server``; append-only file on, so data survives ``restart()``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

from flowcraft_backends._install import apt_install
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import Service

__all__ = ["RedisService"]


class RedisService(Service):
    name = "redis"
    docker_image = "redis:7.4.2-alpine"
    docker_port = 6379
    ready_timeout: ClassVar[float] = 20.0
    install_hint = "apt redis-server"

    def is_installed(self) -> bool:
        return shutil.which("redis-server") is not None

    def install(self) -> None:
        apt_install("redis-server")

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        argv = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(workdir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        return self.spawn(argv, port, workdir)

    def local_url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/0"

    def probe(self, url: str) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.set("flowcraft-backends:probe", "1", ex=5)
            if client.get("flowcraft-backends:probe") != b"1":
                raise RuntimeError("redis probe read back the wrong value")
        finally:
            client.close()
