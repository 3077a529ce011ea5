"""The public surface of flowcraft_bullmq, pinned."""

from __future__ import annotations

import flowcraft_bullmq


def test_all_is_pinned() -> None:
    assert flowcraft_bullmq.__all__ == [
        "BullMQAdapter",
        "BullMQSettings",
        "RedisContext",
    ]


def test_every_name_in_all_is_importable() -> None:
    for name in flowcraft_bullmq.__all__:
        assert getattr(flowcraft_bullmq, name) is not None
