"""A recorder's spool: each event appended to a local file as it is emitted, so the
events still queued in a process that dies are not lost with it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import mmap
import os
import time
import uuid
from collections.abc import Collection
from json.encoder import encode_basestring_ascii as _string
from pathlib import Path
from typing import Any

from flowcraft.events import FlowEvent
from flowcraft.history._records import HistoryEvent, dumps_data, stable_key

logger = logging.getLogger("flowcraft.history")

SUFFIX = ".spool"


class SpoolFull(Exception):
    """The line does not fit in what is left of the spool file (nothing written)."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"a spool line of {needed} bytes does not fit")
        self.needed = needed


class Spool:
    """This process's spool file in ``folder``, locked (``flock``) while it lives: a
    file nobody holds the lock of belongs to a process that died.

    The file is ``capacity`` bytes, mapped into memory (shared): appending a line
    copies it into the operating system's page cache, with no system call. Once
    :meth:`append` returns, the line is the file's, whatever then happens to the
    process (not to the machine), as after a ``write`` call. A ``write`` per event
    cost the job path more than the rest of recording it (the file's size and times
    change each time, and the file system's journal can hold the call when other
    processes write). The unused rest of the file reads as NUL bytes."""

    def __init__(self, folder: str | Path, capacity: int = 1 << 20) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        # Locked under another name first: a recorder looking for orphans never sees
        # this file unlocked.
        hidden = self.folder / f".{name}.new"
        self.fd = os.open(hidden, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _allocate(self.fd, capacity)
            self._map = mmap.mmap(self.fd, capacity)
        except BaseException:
            os.close(self.fd)
            with contextlib.suppress(FileNotFoundError):
                hidden.unlink()
            raise
        self.path = self.folder / f"{name}{SUFFIX}"
        hidden.rename(self.path)
        self.capacity = capacity
        self.size = 0
        """Bytes written."""
        self._strings: dict[str, str] = {}  # JSON of a worker name or a kind, made once

    def append(self, e: HistoryEvent) -> None:
        """Write the event's line (its data's JSON kept on it for the store), or raise
        :class:`SpoolFull`. The line is the JSON array :func:`read` takes, built by
        hand: on the job path, a general encoder's set-up per event cost more than
        the write."""
        text = e.text = dumps_data(e.data)
        strings = self._strings
        worker = strings.get(e.worker) or self._remember(e.worker)
        kind = strings.get(e.kind) or self._remember(e.kind)
        node = "null" if e.node_id is None else _string(e.node_id)
        activation = "null" if e.activation is None else str(int(e.activation))
        attempt = "null" if e.attempt is None else str(int(e.attempt))
        line = (
            f"[{_string(e.run_id)},{kind},{_string(e.key)},{node},{activation},"
            f"{attempt},{float(e.at)!r},{worker},{text}]\n"
        ).encode()
        self._write(line)

    def append_event(self, event: FlowEvent, worker: str) -> None:
        """:meth:`append` for a recorder with no store: a shorter line, made straight
        from the event (no record, no key: the drainer works them out, off the job
        path), or :class:`SpoolFull`."""
        strings = self._strings
        node = event.node_id
        line = (
            f"[{_string(event.run_id)},{strings.get(event.type) or self._remember(event.type)},"
            f"{'null' if node is None else _string(node)},{time.time()!r},"
            f"{strings.get(worker) or self._remember(worker)},{dumps_data(event.data)}]\n"
        ).encode()
        self._write(line)

    def _write(self, line: bytes) -> None:
        start = self.size
        end = start + len(line)
        if end > self.capacity:
            raise SpoolFull(len(line))
        self._map[start:end] = line
        self.size = end

    def _remember(self, text: str) -> str:
        made = _string(text)
        if len(self._strings) < 256:  # a few names and kinds, usually
            self._strings[text] = made
        return made

    def close(self, *, remove: bool) -> None:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._map.close()
        os.close(self.fd)


def _allocate(fd: int, size: int) -> None:
    """Give the file its disk blocks now: a page of a mapped file without one would,
    on a full disk, kill the process (SIGBUS) at the copy instead of failing here."""
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is not None:
        allocate(fd, 0, size)  # the C library writes zeros where the file system cannot
        return
    zeros = bytes(min(size, 1 << 16))
    done = 0
    while done < size:
        done += os.write(fd, zeros[: size - done])


def spool_files(folder: Path) -> list[Path]:
    """The spool files in ``folder``, oldest name first (none if it does not exist)."""
    try:
        return sorted(folder.glob(f"*{SUFFIX}"))
    except FileNotFoundError:
        return []


def orphans(folder: Path, own: Collection[Path] = ()) -> list[Path]:
    """Spool files in ``folder`` whose process died (nobody holds their lock), but
    not this process's ``own``."""
    found = []
    for path in spool_files(folder):
        if path in own:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # taken by another recorder meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # alive
        finally:
            os.close(fd)
        found.append(path)
    return found


def read(path: Path) -> list[HistoryEvent]:
    """A spool file's events (a line that is not a whole event is skipped)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    end = raw.find(b"\0")  # where the writing stopped (no line holds a NUL byte)
    text = (raw if end < 0 else raw[:end]).decode("ascii", errors="replace")
    return parse_lines(text, path.stem)


def parse_lines(text: str, name: str, offset: int = 0) -> list[HistoryEvent]:
    """The events of the lines ``text`` read at ``offset`` of spool file ``name`` (a
    line that is not a whole event is skipped). A short line (:meth:`Spool.append_event`)
    gets its key here; one unique each time it was emitted is named by its place in
    the file, so reading the file again gives the same key."""
    events = []
    at = offset
    for line in text.split("\n"):
        here, at = at, at + len(line) + 1
        if not line:
            continue
        try:
            r: Any = json.loads(line)
            if len(r) == 6:  # run, kind, node, at, worker, data
                data = r[5] if isinstance(r[5], dict) else {"value": r[5]}
                kind, node = r[1], r[2]
                key = stable_key(kind, node, data) or f"{kind}\x1f{name}:{here}"
                activation, attempt = data.get("activation"), data.get("attempt")
                events.append(
                    HistoryEvent(
                        run_id=r[0],
                        kind=kind,
                        key=key,
                        node_id=node,
                        activation=activation if type(activation) is int else None,
                        attempt=attempt if type(attempt) is int else None,
                        at=r[3],
                        worker=r[4],
                        data=data,
                    )
                )
                continue
            events.append(
                HistoryEvent(
                    run_id=r[0],
                    kind=r[1],
                    key=r[2],
                    node_id=r[3],
                    activation=r[4],
                    attempt=r[5],
                    at=r[6],
                    worker=r[7],
                    data=r[8] if isinstance(r[8], dict) else {"value": r[8]},  # as stored
                )
            )
        except (ValueError, TypeError, IndexError, KeyError, AttributeError):
            logger.warning("history spool %s: a line that is no event skipped", name)
    return events
