"""flowcraft on Azure: Storage Queues carry the jobs, Cosmos DB holds run state, Redis
coordinates the fleet."""

from __future__ import annotations

from flowcraft_azure.adapter import AzureAdapter, ConsistencyError
from flowcraft_azure.context import CosmosContext, CosmosRunStore

__all__ = ["AzureAdapter", "ConsistencyError", "CosmosContext", "CosmosRunStore"]
