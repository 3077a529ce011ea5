"""The core's one check of what a context store may keep (flowcraft.serializer)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flowcraft.errors import SerializationError
from flowcraft.serializer import (
    MAX_DEPTH,
    JsonSerializer,
    Serializer,
    check_key,
    encode_value,
    value_depth,
)
from flowcraft.testing.fidelity import EXACT_VALUES, nested, same_value


@pytest.mark.parametrize("name", sorted(EXACT_VALUES))
def test_exact_values_round_trip(name: str) -> None:
    value = EXACT_VALUES[name]
    text = encode_value(name, value)
    text.encode("utf-8")  # always storable as UTF-8
    assert same_value(JsonSerializer().loads(text), value)
    assert same_value(JsonSerializer().loads(text.encode()), value)


def test_same_value_tells_types_and_signs_apart() -> None:
    assert not same_value(1, 1.0)
    assert not same_value(0.0, -0.0)
    assert not same_value(True, 1)
    assert not same_value(10**16, 1e16)
    assert same_value(math.nan, math.nan)
    assert same_value({"a": [1, {"b": -0.0}]}, {"a": [1, {"b": -0.0}]})


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("x\udc00y", ["value is not valid Unicode", "surrogate"]),
        ({"a": [1, "ok", "\ud800"]}, ["value['a'][2]", "surrogate"]),
        ({"ok": {"k\udc00": 1}}, ["a dict key in value['ok']", "surrogate"]),
        (nested(MAX_DEPTH + 1), [f"deeper than {MAX_DEPTH}"]),
        (nested(5000), [f"deeper than {MAX_DEPTH}"]),
        ({"x": [math.nan]}, ["NaN", "value['x'][0]"]),
        (math.inf, ["NaN and Infinity"]),
        ({1, 2}, ["not JSON-serializable"]),
        (10**5000, ["not JSON-serializable"]),
    ],
    ids=[
        "surrogate",
        "nested surrogate",
        "surrogate key",
        "deep",
        "very deep",
        "nan",
        "inf",
        "set",
        "huge int",
    ],
)
def test_unstorable_values_name_key_and_reason(value: Any, words: list[str]) -> None:
    with pytest.raises(SerializationError) as caught:
        encode_value("the key", value)
    message = str(caught.value)
    assert message.startswith("context key 'the key': cannot store the value: ")
    for word in words:
        assert word in message
    message.encode("ascii")  # the reason itself is always storable


def test_depth_limit_is_exact() -> None:
    assert value_depth(0) == 0
    assert value_depth([]) == 1
    assert value_depth({"a": [{}]}) == 3
    assert value_depth(nested(MAX_DEPTH)) == MAX_DEPTH
    encode_value("k", nested(MAX_DEPTH))
    encode_value("k", [nested(MAX_DEPTH - 1)] * 500)  # many containers, none too deep
    with pytest.raises(SerializationError):
        encode_value("k", {"a": nested(MAX_DEPTH)})


def test_keys_must_be_valid_unicode() -> None:
    check_key("")
    check_key("🚀 \x00 é")
    with pytest.raises(SerializationError, match=r"context key 'x\\udc00y' is not valid Unicode"):
        check_key("x\udc00y")
    with pytest.raises(SerializationError, match=r"context key 'x\\udc00y'"):
        encode_value("x\udc00y", 1)
    with pytest.raises(SerializationError, match="keys must be str"):
        check_key(3)


def test_custom_serializer_held_to_the_same_rules() -> None:
    class Loose:
        def dumps(self, value: Any) -> str:
            return str(value)

        def loads(self, text: str | bytes) -> Any:
            return text

    loose: Serializer = Loose()
    assert encode_value("k", "fine", loose) == "fine"
    with pytest.raises(SerializationError, match="surrogate"):
        encode_value("k", "x\udc00", loose)
    with pytest.raises(SerializationError, match="deeper"):
        encode_value("k", nested(MAX_DEPTH + 1), loose)


def test_loads_refuses_what_is_not_json() -> None:
    serializer = JsonSerializer()
    for bad in (b"\xff", "{", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(SerializationError):
            serializer.loads(bad)
