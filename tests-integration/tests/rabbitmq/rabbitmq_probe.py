"""A RabbitMQ worker process for the recovery test, with every setting that governs
recovery (the lease) at the adapter's default.

``python rabbitmq_probe.py`` runs one probe worker (see :mod:`flowcraft_backends.probes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings
from flowcraft_backends.probes import probe_main
from flowcraft_rabbitmq import RabbitMQAdapter


@dataclass
class ProbeSettings(FleetSettings):
    amqp_url: str
    postgres_dsn: str
    redis_url: str
    queue_name: str
    table: str
    key_prefix: str

    def adapter(self, options: RuntimeOptions) -> RabbitMQAdapter:
        return RabbitMQAdapter(
            runtime_options=options,
            amqp_url=self.amqp_url,
            postgres_dsn=self.postgres_dsn,
            redis_url=self.redis_url,
            queue_name=self.queue_name,
            table=self.table,
            key_prefix=self.key_prefix,
        )


if __name__ == "__main__":
    probe_main(ProbeSettings)
