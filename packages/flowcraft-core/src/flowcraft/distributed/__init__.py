"""Running flowcraft across a fleet of workers: the contracts adapters build on.

``RedisCoordinationStore`` needs the ``[redis]`` extra only when instantiated.
"""

from __future__ import annotations

from flowcraft.distributed.coordination import (
    CoordinationStore,
    ICoordinationStore,
    InMemoryCoordinationStore,
)
from flowcraft.distributed.redis import RedisCoordinationStore

__all__ = [
    "CoordinationStore",
    "ICoordinationStore",
    "InMemoryCoordinationStore",
    "RedisCoordinationStore",
]
