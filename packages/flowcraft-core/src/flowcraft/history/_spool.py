"""A recorder's spool: each event appended to a local file as it is emitted, so the
events still queued in a process that dies are not lost with it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import uuid
from json.encoder import encode_basestring_ascii as _string
from pathlib import Path
from typing import Any

from flowcraft.history._records import HistoryEvent, dumps_data

logger = logging.getLogger("flowcraft.history")

SUFFIX = ".spool"


class Spool:
    """This process's spool file in ``folder``, locked (``flock``) while it lives: a
    file nobody holds the lock of belongs to a process that died.

    One ``write`` system call per event: once it returns, the operating system has
    the line, whatever then happens to the process (not to the machine)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        name = uuid.uuid4().hex
        # Locked under another name first: a recorder looking for orphans never sees
        # this file unlocked.
        hidden = self.folder / f".{name}.new"
        self.fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = self.folder / f"{name}{SUFFIX}"
        hidden.rename(self.path)
        self.size = 0
        self._workers: dict[str, str] = {}  # a worker name's JSON (one name, usually)

    def append(self, e: HistoryEvent) -> None:
        """Write the event's line (its data's JSON kept on it for the store). The line
        is the JSON array :func:`read` takes, built by hand: on the job path, a
        general encoder's set-up per event cost more than the write."""
        text = e.text = dumps_data(e.data)
        worker = self._workers.get(e.worker)
        if worker is None:
            worker = self._workers[e.worker] = _string(e.worker)
        node = "null" if e.node_id is None else _string(e.node_id)
        activation = "null" if e.activation is None else str(int(e.activation))
        attempt = "null" if e.attempt is None else str(int(e.attempt))
        line = (
            f"[{_string(e.run_id)},{_string(e.kind)},{_string(e.key)},{node},{activation},"
            f"{attempt},{float(e.at)!r},{worker},{text}]\n"
        )
        self.size += os.write(self.fd, line.encode())

    def empty(self) -> None:
        """Everything spooled is stored: start the file again."""
        os.ftruncate(self.fd, 0)
        self.size = 0

    def close(self, *, remove: bool) -> None:
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        os.close(self.fd)


def orphans(folder: Path, own: Path | None) -> list[Path]:
    """Spool files in ``folder`` whose process died (nobody holds their lock)."""
    found = []
    for path in sorted(folder.glob(f"*{SUFFIX}")):
        if path == own:
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
    events = []
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            r: Any = json.loads(line)
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
        except (ValueError, TypeError, IndexError, KeyError):
            logger.warning("history spool %s: a line that is no event skipped", path.name)
    return events
