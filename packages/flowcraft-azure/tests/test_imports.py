"""The public surface of flowcraft_azure, pinned."""

from __future__ import annotations

import flowcraft_azure


def test_all_is_pinned() -> None:
    assert flowcraft_azure.__all__ == [
        "AzureAdapter",
        "ConsistencyError",
        "CosmosContext",
        "CosmosRunStore",
    ]


def test_every_name_is_importable() -> None:
    for name in flowcraft_azure.__all__:
        assert getattr(flowcraft_azure, name) is not None, name
