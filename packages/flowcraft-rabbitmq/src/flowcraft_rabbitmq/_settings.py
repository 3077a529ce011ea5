"""Names and numbers the adapter derives from its options, validated once.

Every RabbitMQ queue and exchange name derives from ``queue_name``; every SQL
identifier from ``table`` (and ``schema``). Identifiers are configuration, never
run data: they are checked against a strict pattern and then double-quoted, and
they are the only text the adapter ever puts into SQL. Context keys and values
always travel as bind parameters.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

__all__ = [
    "DELAY_BUCKETS_MS",
    "HEADER_ERROR",
    "HEADER_RETRIES",
    "SqlNames",
    "Topology",
    "delay_bucket_ms",
]


# Message headers the adapter owns (everything else on a message is left alone).
HEADER_RETRIES = "x-flowcraft-retries"
HEADER_ERROR = "x-flowcraft-error"

# Delayed redelivery uses one delay queue per bucket: every message in a bucket
# carries the same per-message TTL, so messages expire in queue order and none
# waits behind a longer-lived head (RabbitMQ expires messages only at the head).
# A delay is rounded up to the next bucket; past the last it is the last.
DELAY_BUCKETS_MS: tuple[int, ...] = (
    100,
    250,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    900_000,
    3_600_000,
)

_AMQP_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,200}$")
_SQL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


def delay_bucket_ms(delay_ms: float) -> int:
    """The bucket a delay goes to: 0 for none, else the smallest bucket that covers it."""
    if delay_ms <= 0 or math.isnan(delay_ms):
        return 0
    for bucket in DELAY_BUCKETS_MS:
        if delay_ms <= bucket:
            return bucket
    return DELAY_BUCKETS_MS[-1]


@dataclass(frozen=True, slots=True)
class Topology:
    """The broker objects of one adapter namespace, all derived from ``queue_name``.

    * ``queue``: the durable work queue; rejects dead-letter to ``dead_exchange``.
    * ``dead_exchange`` (fanout) and ``dead_queue``: undecodable and exhausted jobs.
    * ``delay_queue(ms)``: a durable queue without consumers per delay bucket; its
      messages expire after ``ms`` and dead-letter back to ``queue`` through the
      default exchange.
    """

    queue: str

    @classmethod
    def for_queue(cls, queue_name: str) -> Topology:
        if not _AMQP_NAME.fullmatch(queue_name) or queue_name.startswith("amq."):
            raise ValueError(
                f"queue_name {queue_name!r}: use 1-200 letters, digits, '_', '-', '.' or ':' "
                "and do not start with 'amq.'"
            )
        return cls(queue_name)

    @property
    def dead_exchange(self) -> str:
        return f"{self.queue}.dlx"

    @property
    def dead_queue(self) -> str:
        return f"{self.queue}.dead"

    def delay_queue(self, bucket_ms: int) -> str:
        return f"{self.queue}.delay.{bucket_ms}"

    def delay_queues(self) -> list[str]:
        return [self.delay_queue(ms) for ms in DELAY_BUCKETS_MS]


@dataclass(frozen=True, slots=True)
class SqlNames:
    """Quoted SQL identifiers for the runs table, its index, its schema-version table and
    its leases table."""

    schema: str | None
    table: str

    @classmethod
    def create(cls, table: str, schema: str | None = None) -> SqlNames:
        for what, name in (("table", table), ("schema", schema)):
            if name is not None and not _SQL_NAME.fullmatch(name):
                raise ValueError(
                    f"{what} {name!r}: use a letter or '_' then up to 40 letters, digits or '_'"
                )
        return cls(schema, table)

    def _qualified(self, name: str) -> str:
        return f'"{self.schema}"."{name}"' if self.schema else f'"{name}"'

    @property
    def runs(self) -> str:
        return self._qualified(self.table)

    @property
    def versions(self) -> str:
        return self._qualified(f"{self.table}_schema")

    @property
    def leases(self) -> str:
        """The unlogged table of activation leases (see ``_coordination``)."""
        return self._qualified(f"{self.table}_leases")

    @property
    def active_index(self) -> str:
        """The index of unfinished runs on ``updated_at`` (schema versions 1 to 3)."""
        return f'"{self.table}_active"'

    @property
    def active_index_qualified(self) -> str:
        return self._qualified(f"{self.table}_active")

    @property
    def unfinished_index(self) -> str:
        """The index of unfinished runs on ``created_at`` (schema version 4)."""
        return f'"{self.table}_unfinished"'

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel announcing published results (at most 63 bytes)."""
        digest = hashlib.sha256(f"{self.schema or ''}.{self.table}".encode()).hexdigest()
        return f"flowcraft_results_{digest[:24]}"

    @property
    def lock_name(self) -> str:
        """Text hashed into the advisory lock that serialises schema migrations."""
        return f"flowcraft-schema:{self.schema or ''}.{self.table}"
