"""Run ``moto_server`` with DynamoDB requests applied one at a time (run by moto's venv python).

moto's DynamoDB backend has no locking: two concurrent ``UpdateItem ADD`` on one
item can lose an update, and two conditional puts can both succeed (measured:
200 concurrent ADDs from 32 threads lost 1-6 increments, every time). Real
DynamoDB applies each item write atomically, and flowcraft's join counters and
leases depend on it. This wrapper serialises DynamoDB requests (those with an
``X-Amz-Target: DynamoDB_...`` header) behind one lock and leaves everything
else (SQS long polls above all) concurrent, as moto's own server does.

Usage: ``python _moto_atomic.py -H 127.0.0.1 -p PORT`` (moto_server's flags).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and its moto.py (the
# service module) would shadow the moto package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from moto.moto_server.werkzeug_app import (  # noqa: E402
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple  # type: ignore[import-not-found]  # noqa: E402

_DYNAMODB_LOCK = threading.Lock()


def atomic_dynamodb(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """WSGI middleware: a DynamoDB request runs (and its body is produced) under the lock."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return app(environ, start_response)
        with _DYNAMODB_LOCK:
            result = app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        return [body]

    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))
    app = DomainDispatcherApplication(create_backend_app)
    app.debug = True  # as moto_server does
    run_simple(
        args.host,
        args.port,
        atomic_dynamodb(app),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
