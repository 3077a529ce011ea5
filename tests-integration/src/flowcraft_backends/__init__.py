"""Start the real backends flowcraft's tests need: env var, Docker, or a local process.

See ``BACKENDS.md``. Tests use the pytest fixtures ``<name>_service``
(:mod:`flowcraft_backends.plugin`); people use the ``flowcraft-backends`` command.
"""

from flowcraft_backends._service import (
    BackendUnavailable,
    RestartUnsupported,
    RunningService,
    Service,
)

__all__ = ["BackendUnavailable", "RestartUnsupported", "RunningService", "Service"]
