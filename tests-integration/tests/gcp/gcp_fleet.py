"""The Google Cloud fleet the crash tests run: the diamond workflow and a worker process.

``python fleet.py`` runs one worker; its settings come from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`), and the workload, the effects
file and the worker loop are the shared ones of :mod:`flowcraft_backends.crash_fleet`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings, worker_main
from flowcraft_gcp import GcpAdapter


@dataclass
class Settings(FleetSettings):
    pubsub_host: str
    firestore_host: str
    redis_url: str
    project: str
    key_prefix: str
    concurrency: int = 8
    lease_seconds: float = 2.0

    # Branches sleep 0-120 ms (60 on average), so 200 runs outlast the kill cycles.
    branch_delay: ClassVar[float] = 0.04

    def adapter(self, options: RuntimeOptions) -> GcpAdapter:
        # Google's clients find the emulators through these variables only.
        os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
        os.environ["FIRESTORE_EMULATOR_HOST"] = self.firestore_host
        return GcpAdapter(
            runtime_options=options,
            project=self.project,
            redis_url=self.redis_url,
            key_prefix=self.key_prefix,
            concurrency=self.concurrency,
            lease_seconds=self.lease_seconds,
            ack_deadline_seconds=10,
            pull_timeout_seconds=1.0,
            retry_delay_seconds=0.2,
            reconcile_interval_seconds=2.0,
            stalled_after_seconds=10.0,
        )


if __name__ == "__main__":
    worker_main(Settings)
