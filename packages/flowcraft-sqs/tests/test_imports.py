"""The public surface of flowcraft_sqs, pinned."""

from __future__ import annotations

import flowcraft_sqs

EXPECTED = {
    "ACTIVE_RUNS_INDEX",
    "DEFAULT_MAX_STATE_BYTES",
    "AwsClients",
    "AwsSettings",
    "DynamoDbContext",
    "DynamoDbCoordinationStore",
    "QueueUrls",
    "RunTable",
    "SqsAdapter",
    "create_queues",
    "create_table",
}


def test_all_is_pinned() -> None:
    assert set(flowcraft_sqs.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(flowcraft_sqs, name) is not None


def test_adapter_is_a_distributed_adapter() -> None:
    from flowcraft.distributed.adapter import BaseDistributedAdapter

    assert issubclass(flowcraft_sqs.SqsAdapter, BaseDistributedAdapter)


def test_store_satisfies_the_protocol() -> None:
    from flowcraft.distributed import CoordinationStore

    store = flowcraft_sqs.DynamoDbCoordinationStore(
        aws=flowcraft_sqs.AwsSettings(region_name="us-east-1")
    )
    try:
        assert isinstance(store, CoordinationStore)
    finally:
        store.clients.close()
