"""A BullMQ crash fleet whose workers record run history into one SQLite file, each
spooling its events in one folder (``python history_fleet.py``: one worker; see
:mod:`flowcraft_backends.crash_fleet`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from flowcraft import RuntimeOptions
from flowcraft.history import HistoryRecorder, SqliteHistoryStore
from flowcraft_backends.crash_fleet import FleetSettings, worker_main
from flowcraft_bullmq import BullMQAdapter


class RecordingAdapter(BullMQAdapter):
    """A BullMQ worker whose events go to run history; closing it writes what is queued."""

    recorder: HistoryRecorder

    async def aclose(self) -> None:
        await super().aclose()
        await self.recorder.aclose()
        await self.recorder.store.aclose()


@dataclass
class Settings(FleetSettings):
    redis_url: str
    key_prefix: str
    history_path: str
    spool_path: str

    branch_delay: ClassVar[float] = 0.01
    """Branches take 0 to 30 ms: a pass lasts long enough to be killed in the middle."""

    def adapter(self, options: RuntimeOptions) -> RecordingAdapter:
        # Written every 3 s only: a worker killed in its first seconds has stored
        # nothing itself, so its history can come only from its spool file.
        recorder = HistoryRecorder(
            SqliteHistoryStore(self.history_path),
            spool=self.spool_path,
            recover_interval=1.0,
            flush_interval=3.0,
            batch_size=20_000,
        )
        made = RecordingAdapter(
            runtime_options=dataclasses.replace(options, event_bus=recorder),
            connection=self.redis_url,
            key_prefix=self.key_prefix,
            reconcile_interval_seconds=None,
        )
        made.recorder = recorder
        return made


if __name__ == "__main__":
    worker_main(Settings)
