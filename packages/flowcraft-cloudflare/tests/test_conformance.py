"""The adapter conformance kit against the companion Worker on Miniflare."""

from __future__ import annotations

from typing import Any

import pytest

from flowcraft import RuntimeOptions
from flowcraft.testing import AdapterConformanceTests, AdapterFactory
from flowcraft_cloudflare import CloudflareAdapter, WorkerClient


class TestCloudflareAdapter(AdapterConformanceTests):
    supports_dead_letter = True
    supports_queue_retry = True
    supports_duplicate_injection = True

    @pytest.fixture
    def adapter_factory(self, client: WorkerClient, namespace: str) -> AdapterFactory:
        def build(options: RuntimeOptions, **overrides: Any) -> CloudflareAdapter:
            settings: dict[str, Any] = {"visibility_seconds": 10, "poll_seconds": 1}
            return CloudflareAdapter(
                runtime_options=options,
                client=client,
                namespace=namespace,
                queue_name=f"{namespace}-jobs",
                **(settings | overrides),
            )

        return build
