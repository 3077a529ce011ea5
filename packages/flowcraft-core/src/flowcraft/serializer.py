"""Serializers for context values and results. JSON by default; never pickle."""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from flowcraft.errors import SerializationError

__all__ = ["JsonSerializer", "Serializer"]


@runtime_checkable
class Serializer(Protocol):
    def dumps(self, value: Any) -> str: ...
    def loads(self, text: str | bytes) -> Any: ...


class JsonSerializer:
    """Compact JSON. Refuses NaN/Infinity and non-JSON types with a clear error."""

    __slots__ = ()

    def dumps(self, value: Any) -> str:
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"value is not JSON-serializable: {exc}") from exc

    def loads(self, text: str | bytes) -> Any:
        try:
            return json.loads(text)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"invalid JSON: {exc}") from exc
