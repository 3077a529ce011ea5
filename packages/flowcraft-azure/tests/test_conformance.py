"""The adapter conformance kit against Azurite, the Cosmos DB test server and Redis."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.distributed.adapter import BaseDistributedAdapter
from flowcraft.testing import AdapterConformanceTests, AdapterFactory
from flowcraft_azure import AzureAdapter

from .conftest import Namespace

# aiohttp warns that a request body over 1 MB is sent in one piece (the kit writes a
# 1 MB value); the suite turns warnings into errors, which would fail that commit.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Sending a large body directly with raw bytes:ResourceWarning"
)


class TestAzureAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = False  # the pull loop has no queue-mode attempts yet
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, namespace: Namespace) -> AdapterFactory:
        def build(options: RuntimeOptions, **overrides: Any) -> AzureAdapter:
            return namespace.adapter(options, **overrides)

        return build

    async def enqueue_raw(self, adapter: BaseDistributedAdapter, raw: bytes) -> None:
        assert isinstance(adapter, AzureAdapter)
        # Queue messages are text: bytes that are not UTF-8 go as their Latin-1 reading.
        try:
            body = raw.decode()
        except UnicodeDecodeError:
            body = raw.decode("latin-1")
        await adapter.send_body(body)

    async def dead_letters(self, adapter: BaseDistributedAdapter) -> list[str]:
        assert isinstance(adapter, AzureAdapter)
        return [letter.reason for letter in await adapter.dead_letters()]
