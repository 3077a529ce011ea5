"""The Azure fleet the crash test runs: the diamond workflow and a worker process.

``python azure_fleet.py`` runs one worker; its settings come from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`), and the workload, the effects
file and the worker loop are the shared ones of :mod:`flowcraft_backends.crash_fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowcraft import RuntimeOptions
from flowcraft_azure import AzureAdapter
from flowcraft_backends.crash_fleet import FleetSettings, worker_main


@dataclass
class Settings(FleetSettings):
    storage_connection_string: str
    cosmos_url: str
    cosmos_key: str
    redis_url: str
    queue_name: str
    database: str
    container: str
    key_prefix: str
    concurrency: int = 8

    # Branches sleep 0-120 ms (60 on average), so the runs outlast the kill cycles.
    branch_delay: ClassVar[float] = 0.04

    def adapter(self, options: RuntimeOptions) -> AzureAdapter:
        return AzureAdapter(
            runtime_options=options,
            storage_connection_string=self.storage_connection_string,
            cosmos_url=self.cosmos_url,
            cosmos_credential=self.cosmos_key,
            cosmos_options={"enable_endpoint_discovery": False},
            # The test server is one process holding one copy (it reports Session).
            require_strong_consistency=False,
            redis_url=self.redis_url,
            queue_name=self.queue_name,
            database=self.database,
            container=self.container,
            key_prefix=self.key_prefix,
            concurrency=self.concurrency,
            visibility_seconds=3.0,
            lease_seconds=2.0,
            retry_delay_seconds=0.2,
            max_poll_interval=0.2,
            trust_env=False,  # no per-request look-up of proxy settings
        )


if __name__ == "__main__":
    worker_main(Settings)
