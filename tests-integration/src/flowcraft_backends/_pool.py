"""A set of started backends: start each once on demand, stop them all together."""

from __future__ import annotations

import logging
import threading

from flowcraft_backends import services
from flowcraft_backends._service import RunningService

__all__ = ["ServicePool"]

_log = logging.getLogger(__name__)


class ServicePool:
    """Started backends by name, shared by a test session or a CLI run."""

    def __init__(self) -> None:
        self._running: dict[str, RunningService] = {}
        self._lock = threading.Lock()
        self._starting: dict[str, threading.Lock] = {}

    def get(self, name: str) -> RunningService:
        """The running backend ``name``, resolving it on first use (thread-safe).

        Different names may be resolved concurrently; the same name only once.

        Raises:
            BackendUnavailable: if it cannot be resolved.
        """
        with self._lock:
            if name in self._running:
                return self._running[name]
            starting = self._starting.setdefault(name, threading.Lock())
        with starting:
            with self._lock:
                if name in self._running:
                    return self._running[name]
            service = services.get(name).resolve()
            with self._lock:
                self._running[name] = service
            return service

    def running(self) -> dict[str, RunningService]:
        """What has been started so far."""
        with self._lock:
            return dict(self._running)

    def stop(self, name: str) -> None:
        """Stop one backend, if it was started."""
        with self._lock:
            service = self._running.pop(name, None)
        if service is not None:
            service.stop()

    def stop_all(self) -> None:
        """Stop every started backend, the last started first."""
        with self._lock:
            started = list(self._running.values())
            self._running.clear()
        for service in reversed(started):
            try:
                service.stop()
            except Exception:
                _log.exception("stopping %s failed", service.name)
