"""Options of the BullMQ adapter, the Redis key names it owns, and its Redis clients."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import redis.asyncio as redis_asyncio
from pydantic import BaseModel, ConfigDict, Field, model_validator
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from flowcraft.distributed import keys as K
from flowcraft_bullmq._packing import with_c_packing
from flowcraft_bullmq._pipelining import AutoPipelineRedis

__all__ = ["BullMQSettings", "KeepJobs", "RedisKeys"]

KeepJobs = bool | int | dict[str, int]
"""BullMQ job retention: True (remove at once), False (keep all), N (keep the last N)
or ``{"age": seconds, "count": n}``."""


class BullMQSettings(BaseModel):
    """Everything about a ``BullMQAdapter`` except its connection and runtime.

    Recovery after a worker dies is governed by three settings: BullMQ moves the
    dead worker's jobs back to ``wait`` once their lock (``lock_duration_seconds``)
    has expired and a stalled check (every ``stalled_interval_seconds``) has seen
    them twice; a redelivered job then waits for the dead worker's lease on the
    activation (``lease_seconds``). The defaults bring a killed worker's runs back
    within about 4 to 7 seconds (BullMQ's own defaults take 30 to 60 s); measured:
    median 3.9 s, at most 5.7 s (``tests-integration/tests/bullmq/test_recovery.py``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_name: str = Field(default="flowcraft", min_length=1)
    """The BullMQ queue every node job goes through."""
    key_prefix: str = "flowcraft:"
    """Prefix of every key this adapter writes (run state, coordination, the queue)."""
    concurrency: int = Field(default=32, ge=1)
    """Jobs one worker process runs at once."""
    retry_mode: Literal["in-process", "queue"] = "in-process"
    """``queue``: one attempt per delivery, BullMQ schedules retries (``attempts`` and
    exponential or fixed backoff from each node's ``max_retries``/``retry_delay``)."""
    remove_on_complete: KeepJobs = True
    """Retention of completed BullMQ jobs (the run's result lives elsewhere)."""
    remove_on_fail: KeepJobs = 10_000
    """Retention of failed jobs: BullMQ's failed set is the dead-letter queue."""
    state_ttl_seconds: float = Field(default=7 * 24 * 3600, gt=0)
    """How long a run's state, final status and published result live after their
    last write."""
    lease_seconds: float = Field(default=4.0, gt=0)
    """Lease on one node activation; a dead holder's lease expires after this."""
    dedupe_window_seconds: float = Field(default=300.0, gt=0)
    """How long a "follow-up done" mark lets duplicate jobs ack at once."""
    lock_duration_seconds: float = Field(default=4.0, gt=0)
    """BullMQ job lock; renewed every half of it while the job runs."""
    stalled_interval_seconds: float = Field(default=2.0, gt=0)
    """How often a worker looks for jobs whose lock expired (stalled jobs)."""
    max_stalled_count: int = Field(default=10, ge=0)
    """A job that stalls more often than this is failed (dead-lettered) by BullMQ;
    the reconciler then re-drives its run."""
    retry_delay_seconds: float = Field(default=1.0, ge=0)
    """Redelivery delay of a job handed back without a hint (infrastructure errors,
    a version this worker lacks)."""
    reconcile_interval_seconds: float | None = Field(default=30.0, gt=0)
    """How often a worker looks for stalled runs (None: no background reconciler)."""
    stalled_after_seconds: float = Field(default=60.0, gt=0)
    """A running run without progress for this long is re-driven by the reconciler."""
    fast_path: bool = True
    """Fuse the job's reads and lease into one script and write "done" marks behind
    (see ``README.md``, "Cost per job"); False uses the base protocol's calls as is."""
    fetch_next: bool = True
    """Complete a job and fetch the next in one BullMQ call (as Node BullMQ does)."""
    max_connections: int = Field(default=64, ge=2)
    """Size of the adapter's Redis connection pool (when it makes its own client)."""

    @model_validator(mode="after")
    def _lock_outlives_renewal(self) -> BullMQSettings:
        if self.lock_duration_seconds < 0.2:
            raise ValueError("lock_duration_seconds must be at least 0.2")
        return self

    def worker_options(self) -> dict[str, Any]:
        """BullMQ ``WorkerOptions`` (milliseconds)."""
        return {
            "concurrency": self.concurrency,
            "lockDuration": _ms(self.lock_duration_seconds),
            "stalledInterval": _ms(self.stalled_interval_seconds),
            "maxStalledCount": self.max_stalled_count,
            "removeOnComplete": _keep(self.remove_on_complete),
            "removeOnFail": _keep(self.remove_on_fail),
            "autorun": False,
            "prefix": self.bull_prefix,
        }

    @property
    def bull_prefix(self) -> str:
        return f"{self.key_prefix}bull"


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _keep(value: KeepJobs) -> Any:
    return dict(value) if isinstance(value, dict) else value


class RedisKeys:
    """The Redis keys this package owns (the base protocol's keys are in
    ``flowcraft.distributed.keys``; BullMQ's live under ``<key_prefix>bull:``)."""

    __slots__ = ("active", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.active = f"{prefix}runs:active"
        """Sorted set: running runs by the time of their last committed progress."""

    def state(self, run_id: str) -> str:
        """The run's context: one hash, one field per context key."""
        return f"{self.prefix}run:{run_id}"

    def result(self, run_id: str) -> str:
        """The published final result (JSON; kept by the core's ``RedisResults``)."""
        return K.result(self.prefix, run_id)


def make_client(
    url: str, redis_options: Mapping[str, Any], *, max_connections: int, decode: bool = False
) -> redis_asyncio.Redis:
    """An auto-pipelining client on a blocking pool (a burst waits for a free connection
    instead of failing with "Too many connections")."""
    options = {"max_connections": max_connections, "timeout": 20, **redis_options}
    if decode:
        options["decode_responses"] = True
        options["encoding_errors"] = _RAW_BYTES
    options.setdefault("retry", _retry())
    options.setdefault("retry_on_error", _RETRY_ON)
    pool = redis_asyncio.BlockingConnectionPool.from_url(url, **options)
    pool.connection_class = with_c_packing(pool.connection_class)
    return AutoPipelineRedis.from_pool(pool)


def bullmq_client(
    url: str | None, redis_options: Mapping[str, Any], given: Any, *, max_connections: int
) -> redis_asyncio.Redis:
    """A decoding client for BullMQ (its scripts answer text; bytes that are not UTF-8
    decode as lone surrogates), with the same server, TLS and credentials as the
    adapter's client."""
    if url is not None:
        return make_client(url, redis_options, max_connections=max_connections, decode=True)
    pool = given.connection_pool
    kwargs = {**pool.connection_kwargs, "decode_responses": True, "encoding_errors": _RAW_BYTES}
    new_pool = redis_asyncio.BlockingConnectionPool(
        connection_class=with_c_packing(pool.connection_class),
        max_connections=max_connections,
        **kwargs,
    )
    return AutoPipelineRedis.from_pool(new_pool)


_RETRY_ON = [BusyLoadingError, ConnectionError, TimeoutError]

# BullMQ's client decodes replies as text. A job whose data is not UTF-8 (put on the
# queue by another client) would make the reply that fetches it undecodable; with
# ``surrogateescape`` its bytes arrive as lone surrogates, and the worker
# dead-letters the job (see ``_worker.ParsingWorker``).
_RAW_BYTES = "surrogateescape"


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), 5)
