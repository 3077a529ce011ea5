"""pytest plugin: a session-scoped ``<name>_service`` fixture per backend.

Registered as the ``flowcraft_backends`` pytest11 entry point. Fixtures are
generated from the service registry, so a new module under ``services/``
gets one automatically. A backend starts only when a test asks for it and is
stopped at the end of the session (also after failures or Ctrl-C; an atexit
hook stops anything left). A backend that cannot be resolved fails the test
with the reason: it is never skipped. Tests that use any of these fixtures
are marked ``integration``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flowcraft_backends import services
from flowcraft_backends._pool import ServicePool
from flowcraft_backends._process import install_sigterm_handler
from flowcraft_backends._service import BackendUnavailable, RunningService

__all__ = ["FIXTURE_NAMES", "backend_pool"]

# The crash tests' shared checks are plain asserts: rewrite them for pytest's messages.
pytest.register_assert_rewrite("flowcraft_backends.crash_fleet")

#: Fixture name per service name.
FIXTURE_NAMES: dict[str, str] = {name: f"{name}_service" for name in services.names()}


@pytest.fixture(scope="session")
def backend_pool() -> Iterator[ServicePool]:
    """The session's started backends; all are stopped when the session ends."""
    install_sigterm_handler()
    pool = ServicePool()
    try:
        yield pool
    finally:
        pool.stop_all()


def _make_fixture(name: str) -> Callable[..., Any]:
    def fixture(backend_pool: ServicePool) -> RunningService:
        try:
            return backend_pool.get(name)
        except BackendUnavailable as exc:
            pytest.fail(f"backend {name!r} is unavailable: {exc}", pytrace=False)

    fixture.__name__ = FIXTURE_NAMES[name]
    fixture.__doc__ = f"The running {name} backend (session-scoped, started on first use)."
    return pytest.fixture(scope="session", name=FIXTURE_NAMES[name])(fixture)


for _name in FIXTURE_NAMES:
    globals()[FIXTURE_NAMES[_name]] = _make_fixture(_name)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs a real backend started by flowcraft_backends"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    backend_fixtures = set(FIXTURE_NAMES.values())
    for item in items:
        if backend_fixtures.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
