"""flowcraft: workflows that run unchanged in one process or on a fleet of workers."""

import logging

# First: fails at once, with the fix, if PyPI's unrelated `flowcraft` shares this package.
from flowcraft import _distribution  # noqa: F401
from flowcraft.blueprint import (
    EdgeDefinition,
    JoinStrategy,
    NodeConfig,
    NodeDefinition,
    WorkflowBlueprint,
    blueprint_json_schema,
    sanitize_blueprint,
)
from flowcraft.context import (
    AsyncContext,
    BaseAsyncContext,
    Context,
    InMemoryContext,
    PatchOperation,
    TrackingContext,
)
from flowcraft.errors import (
    BlueprintError,
    CancelledRunError,
    ExpressionError,
    FlowcraftError,
    NodeExecutionError,
    NodeTimeoutError,
    PayloadDecodeError,
    SerializationError,
    StateLimitError,
    UnknownBlueprintError,
    UnknownNodeError,
    VersionMismatchError,
)
from flowcraft.events import CollectingEventBus, EventBus, FlowEvent
from flowcraft.expressions import Evaluator, SafeEvaluator
from flowcraft.flow import Flow
from flowcraft.middleware import Middleware
from flowcraft.node import BaseNode, NodeContext, NodeResult
from flowcraft.runtime import (
    FlowRuntime,
    NodeError,
    NodeExecution,
    RunStatus,
    RuntimeOptions,
    WorkflowResult,
)
from flowcraft.serializer import JsonSerializer, Serializer

__version__ = "0.1.0"

__all__ = [
    "AsyncContext",
    "BaseAsyncContext",
    "BaseNode",
    "BlueprintError",
    "CancelledRunError",
    "CollectingEventBus",
    "Context",
    "EdgeDefinition",
    "Evaluator",
    "EventBus",
    "ExpressionError",
    "Flow",
    "FlowEvent",
    "FlowRuntime",
    "FlowcraftError",
    "InMemoryContext",
    "JoinStrategy",
    "JsonSerializer",
    "Middleware",
    "NodeConfig",
    "NodeContext",
    "NodeDefinition",
    "NodeError",
    "NodeExecution",
    "NodeExecutionError",
    "NodeResult",
    "NodeTimeoutError",
    "PatchOperation",
    "PayloadDecodeError",
    "RunStatus",
    "RuntimeOptions",
    "SafeEvaluator",
    "SerializationError",
    "Serializer",
    "StateLimitError",
    "TrackingContext",
    "UnknownBlueprintError",
    "UnknownNodeError",
    "VersionMismatchError",
    "WorkflowBlueprint",
    "WorkflowResult",
    "__version__",
    "blueprint_json_schema",
    "sanitize_blueprint",
]

# A library stays quiet unless the application configures logging: every flowcraft
# logger (adapters included: ``flowcraft.<adapter>``) is under this one.
logging.getLogger("flowcraft").addHandler(logging.NullHandler())
