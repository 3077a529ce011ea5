"""The public surface is deliberate: adding or removing a name is a visible change."""

import flowcraft
import flowcraft.distributed
import flowcraft.testing

EXPECTED = {
    "AsyncContext", "BaseAsyncContext", "BaseNode", "BlueprintError", "CancelledRunError",
    "CollectingEventBus", "Context", "EdgeDefinition", "Evaluator", "EventBus",
    "ExpressionError", "Flow", "FlowEvent", "FlowRuntime", "FlowcraftError",
    "InMemoryContext", "JoinStrategy", "JsonSerializer", "Middleware", "NodeConfig",
    "NodeContext", "NodeDefinition", "NodeError", "NodeExecution", "NodeExecutionError",
    "NodeResult", "NodeTimeoutError", "PatchOperation", "PayloadDecodeError", "RunStatus",
    "RuntimeOptions", "SafeEvaluator", "SerializationError", "Serializer", "StateLimitError",
    "TrackingContext", "UnknownBlueprintError", "UnknownNodeError", "VersionMismatchError",
    "WorkflowBlueprint", "WorkflowResult", "__version__", "blueprint_json_schema",
    "sanitize_blueprint",
}  # fmt: skip


def test_core_exports_exactly_the_public_names() -> None:
    assert set(flowcraft.__all__) == EXPECTED
    for name in flowcraft.__all__:
        assert hasattr(flowcraft, name), name


DISTRIBUTED = {
    "Admission", "BaseDistributedAdapter", "CoordinationStore", "DeadLetter", "FinalResult",
    "ICoordinationStore", "InMemoryCoordinationStore", "JobHandler", "JobPayload",
    "PullingAdapter", "RedisCoordinationStore", "ResultWaiters", "ResultWatch", "RetryJob",
    "RunStatusInfo", "RunStore", "RunStoreContext", "Settlement", "backoff_seconds",
}  # fmt: skip


def test_distributed_exports_the_adapter_authors_surface() -> None:
    assert set(flowcraft.distributed.__all__) == DISTRIBUTED
    for name in flowcraft.distributed.__all__:
        assert hasattr(flowcraft.distributed, name), name


def test_testing_kit_exports_the_store_suite() -> None:
    assert "CoordinationStoreTests" in flowcraft.testing.__all__


HISTORY = {
    "SCHEMA_VERSION", "History", "HistoryError", "HistoryEvent", "HistoryRecorder",
    "HistoryStore", "PostgresHistoryStore", "RunSummary", "SqliteHistoryStore", "Step",
    "event_key", "open_store", "recent_runs", "DEFAULT_MAX_VALUE_BYTES", "TRUNCATED_KEY",
    "PurgeResult", "RebuiltContext", "Truncated", "truncated", "SpoolDrainer",
    "validate_store_url",
}  # fmt: skip


def test_history_exports_its_names() -> None:
    import flowcraft.history

    assert set(flowcraft.history.__all__) == HISTORY
    for name in flowcraft.history.__all__:
        assert getattr(flowcraft.history, name) is not None, name


def test_testing_kit_exports_the_replay_harness() -> None:
    assert {"ReplayReport", "StepChange", "replay_run"} <= set(flowcraft.testing.__all__)


def test_adapter_packages_use_only_public_core_names() -> None:
    """An adapter reaches the core through its public names and hooks: an import of a
    private module (``flowcraft._analysis``, ``flowcraft.history._spool``) would break
    on any refactor of the core."""
    import ast
    from pathlib import Path

    packages = Path(__file__).resolve().parents[2]
    sources = [
        path
        for package in packages.glob("flowcraft-*")
        if package.name != "flowcraft-core"
        for path in (package / "src").rglob("*.py")
    ]
    assert len(sources) > 20  # the seven adapters were found
    private = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "flowcraft" and any(p.startswith("_") for p in parts[1:]):
                    private.append(f"{path.relative_to(packages)}:{node.lineno} {name}")
    assert private == []
