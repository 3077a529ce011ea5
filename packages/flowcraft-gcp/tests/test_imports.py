"""The public surface of flowcraft_gcp, pinned."""

from __future__ import annotations

import flowcraft_gcp

EXPECTED = {
    "DEFAULT_MAX_STATE_BYTES",
    "FIRESTORE_DOCUMENT_LIMIT",
    "FirestoreContext",
    "GcpAdapter",
    "GcpClients",
    "JobQueue",
    "QueueNames",
    "RunCollection",
}


def test_all_is_pinned() -> None:
    assert set(flowcraft_gcp.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(flowcraft_gcp, name) is not None


def test_context_is_an_async_context() -> None:
    from flowcraft.context import AsyncContext

    assert issubclass(flowcraft_gcp.FirestoreContext, AsyncContext)


def test_adapter_is_a_pulling_adapter() -> None:
    from flowcraft.distributed import PullingAdapter

    assert issubclass(flowcraft_gcp.GcpAdapter, PullingAdapter)
