"""The public surface of flowcraft_kafka, pinned."""

from __future__ import annotations

import flowcraft_kafka

EXPECTED = {
    "DEFAULT_MAX_PATCH_BYTES",
    "CassandraClient",
    "CassandraContext",
    "CassandraRunStore",
    "CassandraSettings",
    "KafkaAdapter",
    "KafkaSettings",
    "PatchOutcomeUnknownError",
    "create_schema",
    "create_topics",
}


def test_all_is_pinned() -> None:
    assert set(flowcraft_kafka.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(flowcraft_kafka, name) is not None


def test_settings_refuse_identifiers_that_are_not_plain() -> None:
    import pydantic
    import pytest

    with pytest.raises(pydantic.ValidationError):
        flowcraft_kafka.CassandraSettings(keyspace="x; DROP KEYSPACE y")
    secret = flowcraft_kafka.CassandraSettings(username="u", password="hunter2")
    assert "hunter2" not in repr(secret)
