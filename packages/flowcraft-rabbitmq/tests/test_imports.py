"""The public surface of flowcraft_rabbitmq, pinned."""

from __future__ import annotations

import flowcraft_rabbitmq


def test_all_is_pinned() -> None:
    assert flowcraft_rabbitmq.__all__ == [
        "SCHEMA_VERSION",
        "PostgresContext",
        "PostgresRunStore",
        "RabbitMQAdapter",
    ]


def test_every_name_is_importable() -> None:
    for name in flowcraft_rabbitmq.__all__:
        assert getattr(flowcraft_rabbitmq, name) is not None, name
