"""The Kafka fleet the crash test runs: a worker process of the shared diamond workload.

``python kafka_fleet.py`` runs one worker with settings from the environment (see
:class:`flowcraft_backends.crash_fleet.FleetSettings`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flowcraft import RuntimeOptions
from flowcraft_backends.crash_fleet import FleetSettings, worker_main
from flowcraft_kafka import CassandraSettings, KafkaAdapter, KafkaSettings


@dataclass
class Settings(FleetSettings):
    bootstrap_servers: str
    topic: str
    cassandra_address: str
    local_datacenter: str
    keyspace: str
    redis_url: str
    key_prefix: str
    concurrency: int = 16

    branch_delay = 0.005

    def kafka(self) -> KafkaSettings:
        return KafkaSettings(
            bootstrap_servers=self.bootstrap_servers,
            topic=self.topic,
            group_id=self.topic,
            # A killed member's partitions move after the broker's minimum session.
            consumer_config={"session.timeout.ms": 6000},
        )

    def cassandra(self) -> CassandraSettings:
        return CassandraSettings.from_address(
            self.cassandra_address,
            keyspace=self.keyspace,
            local_datacenter=self.local_datacenter,
            consistency="ONE",
            serial_consistency="SERIAL",
            request_timeout=30.0,
        )

    def adapter(self, options: RuntimeOptions) -> KafkaAdapter:
        return KafkaAdapter(
            runtime_options=options,
            kafka=self.kafka(),
            cassandra=self.cassandra(),
            redis_url=self.redis_url,
            namespace=self.topic,
            key_prefix=self.key_prefix,
            concurrency=self.concurrency,
            poll_seconds=0.2,
            lease_seconds=3.0,
            retry_delay_seconds=0.2,
        )


if __name__ == "__main__":
    # The partition moves (assigned/revoked/lost, INFO) in a failing test's output.
    logging.getLogger("flowcraft.kafka").setLevel(logging.INFO)
    worker_main(Settings)
