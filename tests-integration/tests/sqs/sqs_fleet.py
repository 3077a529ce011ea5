"""The SQS fleet the crash test runs: the diamond workflow and a worker process.

``python sqs_fleet.py`` runs one worker; its settings come from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`), and the workload, the effects
file and the worker loop are the shared ones of :mod:`flowcraft_backends.crash_fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings
from flowcraft_backends.probes import fleet_main
from flowcraft_sqs import AwsSettings, SqsAdapter


@dataclass
class Settings(FleetSettings):
    endpoint_url: str
    region: str
    access_key: str
    queue_url: str
    table: str
    namespace: str
    concurrency: int = 8
    recovery_defaults: bool = False
    """Leave visibility and lease at the adapter's defaults (the recovery test)."""

    branch_delay = 0.005

    def aws(self) -> AwsSettings:
        return AwsSettings(
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.access_key,
        )

    def adapter(self, options: RuntimeOptions) -> SqsAdapter:
        fast: dict[str, Any] = {
            "wait_time_seconds": 1,
            "visibility_timeout": 3,
            "lease_seconds": 2.0,
            "retry_delay_seconds": 0.2,
            "reconcile_interval_seconds": 2.0,
            "stalled_after_seconds": 10.0,
        }
        return SqsAdapter(
            runtime_options=options,
            queue_url=self.queue_url,
            table_name=self.table,
            namespace=self.namespace,
            key_prefix=f"{self.namespace}:",
            aws=self.aws(),
            concurrency=self.concurrency,
            **({} if self.recovery_defaults else fast),
        )


if __name__ == "__main__":
    fleet_main(Settings)
