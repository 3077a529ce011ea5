"""The RabbitMQ fleet the crash tests run: the diamond workflow and a worker process.

``python fleet.py`` runs one worker; its settings come from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`), and the workload, the effects
file and the worker loop are the shared ones of :mod:`flowcraft_backends.crash_fleet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings
from flowcraft_backends.probes import fleet_main
from flowcraft_rabbitmq import RabbitMQAdapter


@dataclass
class Settings(FleetSettings):
    amqp_url: str
    postgres_dsn: str
    redis_url: str
    queue_name: str
    table: str
    key_prefix: str
    concurrency: int = 8
    lease_seconds: float = 2.0
    recovery_defaults: bool = False
    """Leave the lease at the adapter's default (the recovery test)."""

    # Branches sleep 0-120 ms (60 on average): 3,200 of them on 2 x 8 slots take 12 s
    # or more however fast the machine, long enough for the crash test's kill cycles.
    branch_delay: ClassVar[float] = 0.04

    def adapter(self, options: RuntimeOptions) -> RabbitMQAdapter:
        return RabbitMQAdapter(
            runtime_options=options,
            amqp_url=self.amqp_url,
            postgres_dsn=self.postgres_dsn,
            redis_url=self.redis_url,
            queue_name=self.queue_name,
            table=self.table,
            key_prefix=self.key_prefix,
            concurrency=self.concurrency,
            **({} if self.recovery_defaults else self._fast()),
        )

    def _fast(self) -> dict[str, float]:
        return {
            "lease_seconds": self.lease_seconds,
            "retry_delay_seconds": 0.2,
            "reconcile_interval_seconds": 2.0,
            "stalled_after_seconds": 10.0,
        }


if __name__ == "__main__":
    fleet_main(Settings)
