"""PostgreSQL: Debian's ``postgresql`` binaries, a private cluster per run.

``initdb`` makes a fresh cluster in the run directory (trust auth, superuser
``postgres``), and the postmaster listens on 127.0.0.1 only, with its Unix
socket in the run directory. PostgreSQL refuses to run as root, so as root the
cluster belongs to the ``postgres`` system user that the Debian package creates.
Durability settings are relaxed (``fsync=off``): a clean shutdown (SIGINT,
"fast") still checkpoints, so ``restart()`` keeps the data.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from flowcraft_backends._install import InstallError, apt_install, run_checked
from flowcraft_backends._process import LocalProcess
from flowcraft_backends._service import Service, run_async

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["PostgresService"]

_LIB = Path("/usr/lib/postgresql")
_DATA_RECORD = "data-dir"


def _bin_dir() -> Path | None:
    """The newest installed ``/usr/lib/postgresql/<major>/bin`` that has ``postgres``."""
    if not _LIB.is_dir():
        return None
    majors = sorted(
        (p for p in _LIB.iterdir() if p.name.isdigit() and (p / "bin" / "postgres").is_file()),
        key=lambda p: int(p.name),
    )
    return majors[-1] / "bin" if majors else None


def _server_user() -> str | None:
    """``postgres`` when running as root (the server refuses root), else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise InstallError(
            "running as root but there is no 'postgres' user to own the cluster"
        ) from exc
    return "postgres"


class PostgresService(Service):
    name = "postgres"
    docker_image = "postgres:15.10"
    docker_port = 5432
    ready_timeout: ClassVar[float] = 60.0
    stop_signal: ClassVar[signal.Signals] = signal.SIGINT  # "fast" shutdown
    install_hint = "apt postgresql"

    def is_installed(self) -> bool:
        return _bin_dir() is not None

    def install(self) -> None:
        apt_install("postgresql")

    def start_local(self, port: int, workdir: Path) -> LocalProcess:
        bin_dir = _bin_dir()
        if bin_dir is None:
            raise InstallError("PostgreSQL binaries not found under /usr/lib/postgresql")
        user = _server_user()
        data = self._data_dir(workdir, user)
        if not (data / "PG_VERSION").exists():
            run_checked(
                [
                    str(bin_dir / "initdb"),
                    "-D", str(data),
                    "-U", "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                user=user,
            )  # fmt: skip
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(data),
            "-p", str(port),
            "-h", "127.0.0.1",
            "-k", str(data.parent),
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        return self.spawn(argv, port, workdir, user=user)

    @staticmethod
    def _data_dir(workdir: Path, user: str | None) -> Path:
        """Where the cluster lives: ``workdir/data``, unless ``user`` cannot reach workdir.

        As root the server runs as ``postgres``, which cannot enter a work
        directory under, say, ``/root``; then the cluster goes to a directory
        under the system temp dir. The choice is recorded so restarts reuse it.
        """
        record = workdir / _DATA_RECORD
        if record.exists():
            return Path(record.read_text())
        data = workdir / "data"
        if user is not None:
            shutil.chown(workdir, user, user)
            try:
                run_checked(["test", "-w", str(workdir)], user=user)
            except InstallError:
                outside = Path(tempfile.gettempdir()) / "flowcraft-backends-postgres" / workdir.name
                shutil.rmtree(outside, ignore_errors=True)
                outside.mkdir(parents=True)
                shutil.chown(outside, user, user)
                data = outside / "data"
        record.write_text(str(data))
        return data

    def cleanup_local(self, workdir: Path) -> None:
        record = workdir / _DATA_RECORD
        if record.exists():
            parent = Path(record.read_text()).parent
            if not parent.is_relative_to(workdir):
                shutil.rmtree(parent, ignore_errors=True)

    def local_url(self, port: int) -> str:
        return f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def docker_container(self) -> DockerContainer:
        return super().docker_container().with_env("POSTGRES_HOST_AUTH_METHOD", "trust")

    def probe(self, url: str) -> None:
        import asyncpg  # type: ignore[import-untyped]

        async def query() -> None:
            conn = await asyncpg.connect(url, timeout=3)
            try:
                if await conn.fetchval("SELECT 1 + 1") != 2:
                    raise RuntimeError("postgres probe returned the wrong value")
            finally:
                await conn.close()

        run_async(query)
