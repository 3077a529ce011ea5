"""Serializers for context values and results. JSON by default; never pickle.

What a context store may keep is decided here, once, for every store:

* JSON values only (dict with str keys, list, str, int, float, bool, None); NaN and
  Infinity are not JSON and are refused.
* Every string, dict keys included, must be encodable as UTF-8: a lone surrogate
  (``"x\\udc00y"``, legal in a Python ``str``) cannot travel to any backend.
* Containers may nest at most :data:`MAX_DEPTH` levels (``[]`` is one level,
  ``[[]]`` two). Deeper values are refused with a :class:`SerializationError`
  instead of a ``RecursionError`` somewhere in a client driver.
* Ints have no size limit beyond Python's own (4,300 digits by default); floats
  keep their exact ``repr`` (``1e16`` stays a float, ``-0.0`` keeps its sign).

Stores call :func:`encode_value` for every value (and :func:`check_key` for every
key) before they send anything, so a bad value raises ``SerializationError``
naming its key and the reason, before any shared batch or pipeline is built. The
distributed base fails the node (and its run) on that error at commit.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from flowcraft.errors import SerializationError

__all__ = [
    "MAX_DEPTH",
    "JsonSerializer",
    "Serializer",
    "check_key",
    "encode_value",
    "value_depth",
]

MAX_DEPTH = 100
"""How deep containers may nest in a stored value (``[]`` is 1, ``{"a": []}`` is 2)."""

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder()


@runtime_checkable
class Serializer(Protocol):
    def dumps(self, value: Any) -> str: ...
    def loads(self, text: str | bytes) -> Any: ...


class JsonSerializer:
    """Compact UTF-8 JSON. Refuses NaN/Infinity, non-JSON types, strings that are not
    valid Unicode (lone surrogates) and nesting too deep for Python's parser, each
    with a :class:`SerializationError` that says why. The :data:`MAX_DEPTH` limit is
    :func:`encode_value`'s, for context values: a final result wraps them in two
    more levels and must still be published."""

    __slots__ = ()

    def dumps(self, value: Any) -> str:
        return _dumps(value)

    def loads(self, text: str | bytes) -> Any:
        try:
            return _DECODER.decode(text.decode("utf-8") if isinstance(text, bytes) else text)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"invalid JSON: {exc}") from exc
        except RecursionError:
            raise SerializationError("invalid JSON: nested too deeply to decode") from None


def _dumps(value: Any) -> str:
    try:
        text = _ENCODER.encode(value)
    except RecursionError:
        raise SerializationError(_too_deep()) from None
    except ValueError as exc:
        if "Out of range float" in str(exc):
            raise SerializationError(
                f"NaN and Infinity are not JSON (found at {_path(value, _non_finite)})"
            ) from exc
        raise SerializationError(f"value is not JSON-serializable: {exc}") from exc
    except TypeError as exc:
        raise SerializationError(f"value is not JSON-serializable: {exc}") from exc
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise SerializationError(
                f"{_path(value, _not_utf8, 'the string at ')} is not valid Unicode (it holds "
                "a lone surrogate, such as '\\udc00') and cannot be encoded as UTF-8"
            ) from None
    return text


def _too_deep() -> str:
    return (
        f"the value nests deeper than {MAX_DEPTH} levels of lists and dicts "
        "(flowcraft.serializer.MAX_DEPTH)"
    )


def value_depth(value: Any) -> int:
    """How deep lists and dicts nest in ``value`` (0 for a scalar), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > deepest:
            deepest = depth
            if deepest > MAX_DEPTH + 1:
                return deepest  # enough to refuse it; do not walk the rest
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
    return deepest


def check_key(key: Any) -> None:
    """Refuse a context key a store cannot keep: not a str, or not valid Unicode."""
    if not isinstance(key, str):
        raise SerializationError(f"context key {key!r}: keys must be str, not {type(key).__name__}")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"context key {key!r} is not valid Unicode (a lone surrogate at index "
                f"{exc.start}) and cannot be encoded as UTF-8"
            ) from None


def encode_value(key: str, value: Any, serializer: Serializer | None = None) -> str:
    """``value`` as the JSON text a store keeps under context key ``key``.

    Checks the key (:func:`check_key`) and the value (see the module docstring); a
    custom ``serializer``'s text is held to the same rules. Raises
    :class:`SerializationError` naming the key and the reason."""
    check_key(key)
    try:
        if serializer is None or type(serializer) is JsonSerializer:
            text = _dumps(value)
            # Cheap bound first: a value cannot nest deeper than it has containers.
            if text.count("[") + text.count("{") > MAX_DEPTH and value_depth(value) > MAX_DEPTH:
                raise SerializationError(_too_deep())
            return text
        text = serializer.dumps(value)
        if not isinstance(text, str):
            raise SerializationError(f"the serializer returned {type(text).__name__}, not str")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise SerializationError(
                    "the serializer's text is not valid Unicode (a lone surrogate) and "
                    "cannot be encoded as UTF-8"
                ) from None
        if value_depth(value) > MAX_DEPTH:
            raise SerializationError(_too_deep())
        return text
    except SerializationError as exc:
        raise SerializationError(f"context key {key!r}: cannot store the value: {exc}") from exc
    except RecursionError:
        raise SerializationError(
            f"context key {key!r}: cannot store the value: {_too_deep()}"
        ) from None


# ---------------------------------------------------------------- locating a bad part


def _not_utf8(item: Any) -> bool:
    if not isinstance(item, str) or item.isascii():
        return False
    try:
        item.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _non_finite(item: Any) -> bool:
    return isinstance(item, float) and (item != item or item in (float("inf"), float("-inf")))


def _path(value: Any, bad: Any, lead: str = "") -> str:
    """Where in ``value`` the first part ``bad`` accepts is (``value["a"][0]``, or a
    dict key itself), to name it in an error. Only called once a value was refused."""
    stack: list[tuple[Any, str]] = [(value, "value")]
    while stack:
        item, where = stack.pop()
        if bad(item):
            return lead + where
        if isinstance(item, dict):
            for k, v in item.items():
                if bad(k):
                    return f"a dict key in {where}"
                stack.append((v, f"{where}[{k!r}]"))
        elif isinstance(item, list | tuple) and len(stack) < 10_000:
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return lead + "value"
