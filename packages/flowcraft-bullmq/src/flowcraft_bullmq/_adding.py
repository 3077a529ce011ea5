"""Adding plain jobs to a BullMQ queue without building a ``bullmq.Job`` for each.

Every node job this adapter enqueues is a plain job: no delay, priority, parent or
deduplication, options from a handful of fixed sets. ``Queue.add`` builds a ``Job``
object, merges and re-encodes the options and looks up the script's keys for every
call; here the keys are looked up once and each option set is encoded once, and a
job costs one JSON encode, one small msgpack and the ``addStandardJob`` script call
``Queue.add`` would make. The script's arguments are BullMQ 3.4's (the package pins
``bullmq<3.5``); ``tests/test_adding.py`` checks that a job added either way is
stored the same.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import msgpack
from bullmq import Queue
from bullmq.backoffs import Backoffs

__all__ = ["JobAdder"]

# As Queue.add encodes a job's data (ASCII-escaped, so any str reaches Redis).
_DATA = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

_KEYS = ["wait", "paused", "meta", "id", "completed", "delayed", "active", "events", "marker"]


class JobAdder:
    """``Queue.add(name, data, opts)`` for plain jobs; returns the new job's id."""

    __slots__ = ("_keys", "_last", "_options", "_prefix", "_script", "_scripts")

    def __init__(self, queue: Queue) -> None:
        scripts = queue.backend.scripts
        self._scripts = scripts
        self._script = scripts.commands["addStandardJob"]
        self._keys = scripts.getKeys(_KEYS)
        self._prefix = scripts.keys[""]
        self._options: dict[str, bytes] = {}
        self._last: tuple[Mapping[str, Any], bytes] | None = None

    async def add(self, name: str, data: Any, opts: Mapping[str, Any]) -> str:
        return await self.add_raw(name, _DATA.encode(data), opts)

    async def add_raw(self, name: str, data: bytes | str, opts: Mapping[str, Any]) -> str:
        """Add a job whose stored data is ``data`` exactly (JSON text, or anything at
        all: tests put bytes BullMQ cannot parse on the queue this way)."""
        if opts.get("delay") or opts.get("priority") or opts.get("parent"):
            raise ValueError("JobAdder adds plain jobs only (no delay, priority or parent)")
        if opts.get("jobId") or opts.get("deduplication"):
            raise ValueError("JobAdder adds plain jobs only (no job id or deduplication)")
        timestamp = round(time.time() * 1000)
        arguments = msgpack.packb(
            [self._prefix, "", name, timestamp, None, None, None, None, None],
            use_bin_type=True,
        )
        args = [arguments, data, self._packed(opts), timestamp]
        result = await self._script(keys=self._keys, args=args)
        if isinstance(result, int) and result < 0:
            raise self._scripts.finishedErrors(
                {"code": result, "parentKey": None, "command": "addJob"}
            )
        return str(result)

    def _packed(self, opts: Mapping[str, Any]) -> bytes:
        """The options as ``Job`` stores them (defaults, normalized backoff), packed.
        The adapter passes one mapping for all its plain jobs: that costs no encoding."""
        if self._last is not None and self._last[0] is opts:
            return self._last[1]
        cache_key = _DATA.encode(opts)
        packed = self._options.get(cache_key)
        if packed is None:
            final = {"attempts": 0, "delay": 0, **opts}
            final["backoff"] = Backoffs.normalize(opts.get("backoff"))
            packed = msgpack.packb(self._scripts.encodeOpts(final))
            if len(self._options) > 1000:
                self._options.clear()
            self._options[cache_key] = packed
        self._last = (opts, bytes(packed))
        return self._last[1]
