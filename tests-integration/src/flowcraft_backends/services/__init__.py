"""Registry of service modules.

Each module ``services/<name>.py`` defines one concrete :class:`Service`
subclass whose ``name`` is ``<name>``. Modules are found by listing the
package (without importing them), so a new module gets a pytest fixture and a
CLI name without being listed anywhere. A module is imported only when its
service is asked for; one that is not written yet, or fails to import, makes
that request fail with a clear message and does not affect the others.
Import heavy client libraries inside methods, not at module top level.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import pkgutil

from flowcraft_backends._service import BackendUnavailable, Service

__all__ = ["EXPECTED", "get", "module_names", "names", "service_class"]

_log = logging.getLogger(__name__)

#: Services the project expects; each gets a fixture even before its module exists.
EXPECTED = (
    "redis",
    "postgres",
    "rabbitmq",
    "moto",
    "azurite",
    "cosmos",
    "pubsub",
    "firestore",
    "miniflare",
    "kafka",
    "cassandra",
)


def module_names() -> list[str]:
    """Service modules present in this package (listed, not imported)."""
    return sorted(
        info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
    )


def names() -> list[str]:
    """Every service name: the expected ones first, then any other module found."""
    return [*EXPECTED, *(name for name in module_names() if name not in EXPECTED)]


def _service_classes(module: object) -> list[type[Service]]:
    return [
        obj
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, Service)
        and obj.__module__ == getattr(module, "__name__", None)
        and not inspect.isabstract(obj)
    ]


@functools.cache
def service_class(name: str) -> type[Service]:
    """Import ``services.<name>`` (on first use) and return its Service subclass.

    Raises:
        BackendUnavailable: if the module is missing, fails to import, or does
            not define exactly one concrete Service subclass named ``name``.
    """
    if name not in module_names():
        raise BackendUnavailable(
            f"no service module for {name!r}: expected flowcraft_backends/services/{name}.py "
            f"defining one Service subclass with name = {name!r} "
            f"(present: {', '.join(module_names()) or 'none'})"
        )
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except Exception as exc:
        _log.warning("service module %s failed to import: %r", name, exc)
        raise BackendUnavailable(
            f"service module flowcraft_backends.services.{name} failed to import: {exc!r}"
        ) from exc
    classes = _service_classes(module)
    if len(classes) != 1 or classes[0].name != name:
        found = ", ".join(f"{cls.__name__} (name={cls.name!r})" for cls in classes) or "none"
        raise BackendUnavailable(
            f"flowcraft_backends.services.{name} must define exactly one concrete Service "
            f"subclass with name = {name!r}; found: {found}"
        )
    return classes[0]


def get(name: str) -> Service:
    """A fresh instance of the named service (see :func:`service_class`)."""
    return service_class(name)()
