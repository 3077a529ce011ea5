"""Commands packed in C: redis.asyncio connections whose ``pack_command`` is hiredis'.

redis-py's asyncio connection packs every command in Python, one argument at a
time (hiredis, when installed, only parses the replies). BullMQ's scripts take
15 to 20 arguments per call, so packing was the largest single CPU cost of a
worker (a third of its time in a profile of the chain benchmark).
``hiredis.pack_command`` writes the same bytes in C. Anything it refuses (an
argument type it does not take, a non-UTF-8 encoder) goes to redis-py's packer,
which then packs it or raises its usual ``DataError``. Without hiredis (the
``flowcraft-bullmq[hiredis]`` extra) connections keep redis-py's packer.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from redis.asyncio.connection import AbstractConnection

hiredis: ModuleType | None
try:
    import hiredis
except ImportError:  # the [hiredis] extra is not installed
    hiredis = None

__all__ = ["with_c_packing"]

_UTF8 = frozenset({"utf-8", "utf8"})
# hiredis encodes text as strict UTF-8: the same bytes as these error handlers give
# for any valid text; a str only they could encode (a lone surrogate) falls back.
_ERRORS = frozenset({"strict", "surrogateescape"})


class _CPacking(AbstractConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        encoder = self.encoder
        if encoder.encoding.lower() not in _UTF8 or encoder.encoding_errors not in _ERRORS:
            return super().pack_command(*args)
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]  # type: ignore[union-attr]
        except (TypeError, UnicodeEncodeError):
            return super().pack_command(*args)


_made: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def with_c_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain, TLS or Unix socket connection) with hiredis packing, if installed."""
    if hiredis is None or issubclass(cls, _CPacking):
        return cls
    made = _made.get(cls)
    if made is None:
        made = _made[cls] = type(f"{cls.__name__}WithCPacking", (_CPacking, cls), {})
    return made
