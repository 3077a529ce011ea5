"""A BullMQ fleet module for the recovery test: ``python bullmq_fleet.py`` runs one
worker with every setting that governs recovery (lease, lock, stall checks) at the
adapter's default (see :mod:`flowcraft_backends.probes`)."""

from __future__ import annotations

from dataclasses import dataclass

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings
from flowcraft_backends.probes import fleet_main
from flowcraft_bullmq import BullMQAdapter


@dataclass
class Settings(FleetSettings):
    redis_url: str
    key_prefix: str

    def adapter(self, options: RuntimeOptions) -> BullMQAdapter:
        return BullMQAdapter(
            runtime_options=options, connection=self.redis_url, key_prefix=self.key_prefix
        )


if __name__ == "__main__":
    fleet_main(Settings)
