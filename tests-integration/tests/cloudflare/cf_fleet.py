"""The Cloudflare fleet the crash test runs: the diamond workflow and a worker process.

``python cf_fleet.py`` runs one worker; its settings come from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`), and the workload, the effects
file and the worker loop are the shared ones of :mod:`flowcraft_backends.crash_fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings
from flowcraft_backends.probes import fleet_main
from flowcraft_cloudflare import CloudflareAdapter, WorkerSettings


@dataclass
class Settings(FleetSettings):
    url: str
    secret: str
    namespace: str
    direct: bool = False
    concurrency: int = 16
    recovery_defaults: bool = False
    """Leave visibility and lease at the adapter's defaults (the recovery test)."""

    branch_delay = 0.005

    def adapter(self, options: RuntimeOptions) -> CloudflareAdapter:
        fast: dict[str, Any] = {
            "visibility_seconds": 3.0,
            "lease_seconds": 2.0,
            "retry_delay_seconds": 0.2,
            "reconcile_interval_seconds": 2.0,
            "stalled_after_seconds": 10.0,
        }
        return CloudflareAdapter(
            runtime_options=options,
            settings=WorkerSettings(url=self.url, secret=self.secret),
            namespace=self.namespace,
            queue_name=f"{self.namespace}-jobs",
            direct=self.direct,
            concurrency=self.concurrency,
            poll_seconds=1.0,
            **({} if self.recovery_defaults else fast),
        )


if __name__ == "__main__":
    fleet_main(Settings)
