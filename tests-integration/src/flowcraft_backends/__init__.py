"""Start the real backends flowcraft's tests need: env var, Docker, or a local process.

See ``BACKENDS.md``. Tests use the pytest fixtures ``<name>_service``
(:mod:`flowcraft_backends.plugin`); people use the ``flowcraft-backends`` command.

Environment variables:
    FLOWCRAFT_TEST_<NAME>_URL: use this running backend as it is.
    FLOWCRAFT_BACKENDS_DOCKER: ``0`` skips Docker even when an engine answers.
    FLOWCRAFT_BACKENDS_ENV_TIMEOUT: seconds to wait for a backend given by URL
        (default: the service's own start timeout).
    FLOWCRAFT_BACKENDS_DIR: work directory for installs, data and logs
        (default: ``.flowcraft-backends/`` at the repository root).
    FLOWCRAFT_BACKENDS_KEEP: ``1`` keeps a stopped server's data directory.
"""

from flowcraft_backends._service import (
    BackendUnavailable,
    RestartUnsupported,
    RunningService,
    Service,
    wait_for,
)

__all__ = ["BackendUnavailable", "RestartUnsupported", "RunningService", "Service", "wait_for"]
