"""flowcraft on BullMQ and Redis: node jobs on a BullMQ queue, run state in a Redis hash."""

from flowcraft_bullmq._settings import BullMQSettings
from flowcraft_bullmq.adapter import BullMQAdapter
from flowcraft_bullmq.context import RedisContext

__all__ = ["BullMQAdapter", "BullMQSettings", "RedisContext"]
