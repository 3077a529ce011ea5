"""The core's context-store kit (guarded patch included) on the Firestore emulator; the
racing tests race through separate clients."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from flowcraft.context import AsyncContext
from flowcraft.testing import ContextStoreTests
from flowcraft_gcp import FirestoreContext, GcpClients, RunCollection

from .conftest import Backends


class TestFirestoreContext(ContextStoreTests):
    @pytest.fixture
    def context(self, clients: GcpClients) -> AsyncContext:
        return RunCollection(clients).context(f"run-{uuid.uuid4().hex[:10]}")

    @pytest.fixture(autouse=True)
    async def _other_clients(self, backends: Backends, project: str) -> AsyncIterator[None]:
        self.other = GcpClients(project)
        yield
        await self.other.aclose()

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        """The run through another client: its own channel, its own in-process lock."""
        assert isinstance(context, FirestoreContext)
        return RunCollection(self.other).context(context.run_id)
