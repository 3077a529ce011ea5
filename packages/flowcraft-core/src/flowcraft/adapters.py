"""Adapters by name, so ``pip install flowcraft-sqs`` makes ``flowcraft worker --adapter sqs`` work.

Each adapter package declares one entry point in the ``flowcraft.adapters`` group whose
value is an :class:`AdapterPlugin`: its settings (an :class:`AdapterSettings` subclass,
read from ``FLOWCRAFT_<NAME>_<FIELD>`` environment variables and validated) and a tiny
factory that builds the adapter from them::

    [project.entry-points."flowcraft.adapters"]
    sqs = "flowcraft_sqs.plugin:ADAPTER"

Everything else (finding, loading, reading and checking settings, error messages that
never echo a credential) lives here once.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Generic, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowcraft.distributed import BaseDistributedAdapter
from flowcraft.errors import FlowcraftError
from flowcraft.runtime import RuntimeOptions

__all__ = [
    "ENTRY_POINT_GROUP",
    "AdapterNotFoundError",
    "AdapterPlugin",
    "AdapterSettings",
    "AdapterSettingsError",
    "available_adapters",
    "build_adapter",
    "load_adapter",
    "read_settings",
    "redact_url",
]

ENTRY_POINT_GROUP = "flowcraft.adapters"


class AdapterNotFoundError(FlowcraftError):
    """No installed package registers an adapter under that name."""


class AdapterSettingsError(FlowcraftError):
    """An adapter's settings are missing or invalid (the message names the fields and
    their environment variables, never the values given)."""


class AdapterSettings(BaseSettings):
    """Options every adapter takes (left unset: the adapter's own defaults apply).

    Subclasses add their backend's fields and set ``env_prefix`` to
    ``FLOWCRAFT_<NAME>_``; anything that can hold a credential is a ``SecretStr``.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_ignore_empty=True)

    concurrency: int | None = Field(default=None, ge=1)
    """Jobs one worker process runs at once."""
    key_prefix: str | None = None
    retry_mode: Literal["in-process", "queue"] | None = None
    retry_delay_seconds: float | None = Field(default=None, ge=0)
    lease_seconds: float | None = Field(default=None, gt=0)
    state_ttl_seconds: float | None = Field(default=None, gt=0)
    reconcile_interval_seconds: float | None = Field(default=None, gt=0)
    stalled_after_seconds: float | None = Field(default=None, gt=0)
    worker_id: str | None = None

    def base_options(self) -> dict[str, Any]:
        """The options of ``BaseDistributedAdapter`` that were set, as keyword arguments."""
        return {
            name: value
            for name in AdapterSettings.model_fields
            if (value := getattr(self, name)) is not None
        }


S = TypeVar("S", bound=AdapterSettings)


@dataclass(frozen=True, slots=True)
class AdapterPlugin(Generic[S]):
    """What an adapter package registers: its settings and the factory that uses them.

    ``url_field`` and ``queue_field`` name the settings fields that the CLI's ``--url``
    and ``--queue`` set (the backend's main address and the job queue)."""

    name: str
    settings: type[S]
    build: Callable[[S, RuntimeOptions], BaseDistributedAdapter]
    url_field: str | None = None
    queue_field: str | None = None

    def env_var(self, field: str) -> str:
        prefix = str(self.settings.model_config.get("env_prefix") or "")
        return f"{prefix}{field}".upper()

    def describe(self, settings: AdapterSettings) -> dict[str, str]:
        """The address and queue for a log line, with any credential removed."""
        found: dict[str, str] = {}
        for label, name in (("url", self.url_field), ("queue", self.queue_field)):
            value = getattr(settings, name) if name else None
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is not None:
                found[label] = redact_url(str(value))
        return found


def available_adapters() -> dict[str, EntryPoint]:
    """The installed adapters by name (loading none of them)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_adapter(name: str) -> AdapterPlugin[Any]:
    """The plugin registered as ``name``; a clear error naming what is installed."""
    found = available_adapters()
    entry = found.get(name)
    if entry is None:
        installed = ", ".join(sorted(found)) or "none"
        raise AdapterNotFoundError(
            f"no adapter named {name!r} is installed (installed: {installed}); "
            f"install it, e.g. pip install flowcraft-{name}"
        )
    try:
        plugin = entry.load()
    except Exception as exc:
        raise AdapterNotFoundError(
            f"adapter {name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(plugin, AdapterPlugin):
        raise AdapterNotFoundError(f"adapter {name!r} ({entry.value}) is not an AdapterPlugin")
    return plugin


def read_settings(plugin: AdapterPlugin[S], overrides: Mapping[str, Any] | None = None) -> S:
    """The plugin's settings: ``overrides`` (command-line options) over the environment
    over the defaults, validated. Errors name each field and its environment variable
    but never the value (it may be a credential)."""
    given = dict(overrides or {})
    unknown = sorted(set(given) - set(plugin.settings.model_fields))
    if unknown:
        known = ", ".join(sorted(plugin.settings.model_fields))
        raise AdapterSettingsError(
            f"adapter {plugin.name!r} has no setting {', '.join(map(repr, unknown))} "
            f"(settings: {known})"
        )
    try:
        return plugin.settings(**given)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            top = str(error["loc"][0]) if error["loc"] else ""
            where = f" ({plugin.env_var(top)})" if top in plugin.settings.model_fields else ""
            problems.append(f"{field}{where}: {error['msg']}")
        raise AdapterSettingsError(
            f"adapter {plugin.name!r}: invalid settings: {'; '.join(problems)}"
        ) from None


def build_adapter(
    name: str,
    runtime_options: RuntimeOptions,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[BaseDistributedAdapter, AdapterPlugin[Any], AdapterSettings]:
    """Load adapter ``name``, read its settings and build it."""
    plugin = load_adapter(name)
    settings = read_settings(plugin, overrides)
    return plugin.build(settings, runtime_options), plugin, settings


def redact_url(text: str) -> str:
    """``text`` without the password of a URL (and without query parameters, which
    can hold tokens); anything that is not a URL is returned as is."""
    parsed = urllib.parse.urlsplit(text)
    if not parsed.scheme or not parsed.netloc:
        return text
    netloc = parsed.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        name = user.partition(":")[0]
        netloc = f"{name}:***@{host}" if name else f"***@{host}"
    query = "..." if parsed.query else ""
    return urllib.parse.urlunsplit((parsed.scheme, netloc, parsed.path, query, ""))
