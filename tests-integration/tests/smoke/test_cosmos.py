"""Cosmos smoke test: a patch that sets one field and removes another."""

from __future__ import annotations

import uuid

from azure.cosmos import CosmosClient, PartitionKey

from flowcraft_backends import RunningService


def test_patch_set_and_remove(cosmos_service: RunningService) -> None:
    client = CosmosClient(
        cosmos_service.url,
        credential=cosmos_service.extra["key"],
        enable_endpoint_discovery=False,
    )
    database = client.create_database_if_not_exists(f"smoke-{uuid.uuid4().hex[:12]}")
    try:
        container = database.create_container_if_not_exists(
            "runs", partition_key=PartitionKey(path="/id")
        )
        container.create_item({"id": "run-1", "status": "pending", "lease": "worker-1"})

        patched = container.patch_item(
            "run-1",
            partition_key="run-1",
            patch_operations=[
                {"op": "set", "path": "/status", "value": "done"},
                {"op": "remove", "path": "/lease"},
            ],
        )

        assert patched["status"] == "done"
        assert "lease" not in patched
        stored = container.read_item("run-1", partition_key="run-1")
        assert stored["status"] == "done"
        assert "lease" not in stored
    finally:
        client.delete_database(database)
