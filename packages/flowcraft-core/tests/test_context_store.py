"""The context store kit (guarded patch included) on the in-memory contexts."""

from __future__ import annotations

import asyncio

import pytest

from flowcraft.context import AsyncContext, InMemoryContext
from flowcraft.distributed.memory import InMemoryBroker, InMemoryRunContext
from flowcraft.testing import ContextStoreTests


class TestInMemoryContext(ContextStoreTests):
    @pytest.fixture
    def context(self) -> AsyncContext:
        return InMemoryContext()


async def _yield(operation: str, run_id: str) -> None:
    """A round trip: other tasks run between a call and its effect."""
    await asyncio.sleep(0)


class TestInMemoryRunContext(ContextStoreTests):
    @pytest.fixture
    def context(self) -> AsyncContext:
        self._broker = InMemoryBroker(fault=_yield)
        return InMemoryRunContext(self._broker, "run")

    async def same_run(self, context: AsyncContext) -> AsyncContext:
        return InMemoryRunContext(self._broker, "run")
