"""A machine's history writer: stores what its worker processes append to their spool
files, so that no worker spends its own time on the store."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flowcraft.history._records import HistoryEvent, HistoryStore
from flowcraft.history._spool import parse_lines, spool_files

__all__ = ["SpoolDrainer"]

logger = logging.getLogger("flowcraft.history")

_CHUNK = 1 << 20


@dataclass(slots=True)
class _Followed:
    """A spool file being read: how far, and whether its writer is gone."""

    fd: int
    offset: int = 0
    ended: bool = False
    """Its writer let go of it (closed it when full, or died): once read to the end,
    it goes."""


class SpoolDrainer:
    """Stores the events that recorders built with ``HistoryRecorder(None,
    spool=folder)`` append to their spool files in ``folder``.

    Every ``interval`` seconds it reads what each file gained since the last look
    (up to the first byte not written yet: a file starts as NUL bytes, and no line
    holds one, so a line read whole was written whole) and writes it to ``store``
    in batches of up to ``batch_size``. A file whose writer let go of it (set aside
    when full, closed, or its process died) is read to its end and deleted. One
    drainer per folder; a second one, or a drainer restarted, stores some events
    again, which the store ignores (it keeps an event's first copy).

    While the store is unreachable the events wait in the files (nothing is read
    past what was stored), so a drainer that stops or dies loses nothing either."""

    def __init__(
        self,
        store: HistoryStore,
        folder: str | Path,
        *,
        interval: float = 0.1,
        batch_size: int = 2000,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.store = store
        self.folder = Path(folder)
        self.interval = interval
        self.batch_size = batch_size
        self.stored = 0
        """Events written to the store (a repeat of a stored event counts too)."""
        self._files: dict[Path, _Followed] = {}

    async def drain(self) -> int:
        """One pass over the folder: store what every file gained, delete the files
        their writers let go of once stored. Returns how many events it read and
        handed to the store (an event the store refused alone is counted, logged);
        raises what the store raised (what was not stored is read again next time)."""
        total = 0
        for path in await asyncio.to_thread(self._look):
            total += await self._drain_file(path)
        return total

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Drain until ``stop`` is set (or the task is cancelled), then once more."""
        stop = stop or asyncio.Event()
        pause = self.interval
        while not stop.is_set():
            try:
                await self.drain()
                pause = self.interval
            except Exception as exc:
                logger.warning("history drain failed (tried again in %.1f s): %r", pause, exc)
                pause = min(max(pause, 0.2) * 3, 5.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await stop.wait()
        await self.drain()

    def close(self) -> None:
        """Let go of the files (they stay, for the next drainer)."""
        for followed in self._files.values():
            os.close(followed.fd)
        self._files.clear()

    async def __aenter__(self) -> SpoolDrainer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ files

    def _look(self) -> list[Path]:
        """The files to read this pass (opening the new ones), noting which of them
        their writer let go of: checked before reading, so what a writer appended
        before letting go is in this pass's read."""
        present = set(spool_files(self.folder))
        for gone in [p for p in self._files if p not in present]:
            os.close(self._files.pop(gone).fd)  # deleted by someone else
        for path in sorted(present):
            followed = self._files.get(path)
            if followed is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                followed = self._files[path] = _Followed(fd)
            if not followed.ended:
                try:
                    fcntl.flock(followed.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    followed.ended = True  # kept locked: no recorder recovers it too
                except BlockingIOError:
                    pass
        return sorted(self._files)

    async def _drain_file(self, path: Path) -> int:
        followed = self._files[path]
        stored = 0
        size = _CHUNK
        while True:
            raw = await asyncio.to_thread(os.pread, followed.fd, size, followed.offset)
            end = raw.find(b"\0")
            last = end >= 0 or len(raw) < size  # up to where the writer is
            cut = raw.rfind(b"\n", 0, None if end < 0 else end) + 1
            if not cut and not last:
                size *= 2  # a line longer than what was read (a large value)
                continue
            size = _CHUNK
            if cut:
                text = raw[:cut].decode("ascii", errors="replace")
                events = parse_lines(text, path.stem, followed.offset)
                for i in range(0, len(events), self.batch_size):
                    await self._write(events[i : i + self.batch_size])
                followed.offset += cut
                stored += len(events)
            if last or not cut:
                break
        if followed.ended:
            await asyncio.to_thread(_remove, path)
            os.close(self._files.pop(path).fd)
        return stored

    async def _write(self, events: list[HistoryEvent]) -> None:
        """Store ``events``. A refused batch is halved until the event the store refuses
        alone is found; that one is given up on (logged) if the store still answers a
        read (so one bad event never holds back the file behind it), else the store
        is down: raised, and read again next pass (a few calls, not one per event)."""
        try:
            await self.store.write(events)
            self.stored += len(events)
            return
        except Exception as exc:
            if len(events) > 1:
                half = len(events) // 2
                await self._write(events[:half])
                await self._write(events[half:])
                return
            refused = exc
        try:
            await self.store.runs(limit=1)
        except Exception:
            raise refused from None
        event = events[0]
        logger.error(
            "history: %s event of run %s not recorded: %r", event.kind, event.run_id, refused
        )


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
