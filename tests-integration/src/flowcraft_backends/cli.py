"""``flowcraft-backends``: start, list and install the test backends by hand.

    flowcraft-backends up redis postgres     # prints export lines, runs until Ctrl-C
    flowcraft-backends list
    flowcraft-backends install rabbitmq azurite

``up`` writes only ``export NAME=value`` lines to stdout (progress goes to
stderr), so ``flowcraft-backends up redis > backends.env &`` then
``. backends.env`` points another shell's tests at the running servers.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from flowcraft_backends import services
from flowcraft_backends._install import InstallError
from flowcraft_backends._pool import ServicePool
from flowcraft_backends._process import install_sigterm_handler
from flowcraft_backends._service import BackendUnavailable, RunningService

__all__ = ["main"]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_names(names: Sequence[str]) -> list[str]:
    known = services.names()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown service(s): {', '.join(unknown)} (known: {', '.join(known)})")
    return list(names)


def _cmd_up(names: Sequence[str]) -> int:
    install_sigterm_handler()
    pool = ServicePool()
    started = time.monotonic()

    def start(name: str) -> RunningService:
        _err(f"# starting {name} ...")
        service = pool.get(name)
        _err(f"# {name}: {service.how} at {service.url} ({time.monotonic() - started:.1f} s)")
        return service

    try:
        # Installs and starts run side by side; the export lines come out in order.
        with ThreadPoolExecutor(max_workers=4) as executor:
            for service in executor.map(start, _check_names(names)):
                for key, value in service.exports().items():
                    print(f"export {key}={shlex.quote(value)}", flush=True)
                for key, value in service.extra.items():
                    _err(f"#   {service.name} {key}: {value}")
                if service.log_path:
                    _err(f"#   {service.name} log: {service.log_path}")
        _err(f"# all up in {time.monotonic() - started:.1f} s; Ctrl-C to stop")
        stop = threading.Event()
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    except BackendUnavailable as exc:
        _err(f"error: {exc}")
        return 1
    finally:
        _err("# stopping ...")
        pool.stop_all()
    return 0


def _cmd_list() -> int:
    rows = [("NAME", "ENV VAR", "INSTALLED", "DOCKER IMAGE / INSTALL")]
    for name in services.names():
        try:
            service = services.get(name)
        except BackendUnavailable as exc:
            rows.append((name, "-", "-", f"unavailable: {str(exc).splitlines()[0][:80]}"))
            continue
        info = service.describe()
        installed = "yes" if info["installed"] else "no"
        rows.append(
            (name, info["env_var"], installed, f"{info['docker_image']} / {info['install']}")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
    return 0


def _cmd_install(names: Sequence[str]) -> int:
    started = time.monotonic()

    def install(name: str) -> bool:
        try:
            services.get(name).ensure_installed()
        except (BackendUnavailable, InstallError) as exc:
            _err(f"{name}: install failed: {exc}")
            return False
        print(f"{name}: installed ({time.monotonic() - started:.1f} s)", flush=True)
        return True

    with ThreadPoolExecutor(max_workers=4) as executor:
        results = list(executor.map(install, _check_names(names)))
    return 0 if all(results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flowcraft-backends`` command."""
    parser = argparse.ArgumentParser(prog="flowcraft-backends", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start backends, print export lines, wait for Ctrl-C")
    up.add_argument("names", nargs="+", metavar="NAME")
    commands.add_parser("list", help="list the known backends")
    install = commands.add_parser("install", help="install backends for local use")
    install.add_argument("names", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.command == "up":
        return _cmd_up(args.names)
    if args.command == "list":
        return _cmd_list()
    return _cmd_install(args.names)


if __name__ == "__main__":
    sys.exit(main())
