"""What a node is: a function or a ``BaseNode`` class, and what it sees and returns."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from flowcraft.blueprint import NodeDefinition
    from flowcraft.context import AsyncContext

__all__ = [
    "BaseNode",
    "NodeContext",
    "NodeFunction",
    "NodeImplementation",
    "NodeResult",
]


@dataclass(slots=True)
class NodeResult:
    """A node's outcome. ``action`` picks edges by their ``action``; ``dynamic_nodes``
    are run right after this node, before its successors."""

    output: Any = None
    action: str | None = None
    error: str | None = None
    dynamic_nodes: list[NodeDefinition] | None = None

    def to_scope(self) -> dict[str, Any]:
        """The ``result`` name that edge conditions see."""
        return {"output": self.output, "action": self.action, "error": self.error}


@dataclass(slots=True)
class NodeContext:
    """Everything a node sees while it runs.

    ``idempotency_key`` is the same on every attempt and every redelivery of one
    activation of this node, and differs between loop iterations: use it to make
    side effects outside the workflow happen once.
    """

    context: AsyncContext
    input: Any
    params: Mapping[str, Any]
    dependencies: Mapping[str, Any]
    run_id: str
    node_id: str
    attempt: int = 1
    activation: int = 1
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    node: NodeDefinition | None = None

    @property
    def idempotency_key(self) -> str:
        """``run:node:activation``, each id escaped (``%`` as ``%25``, ``:`` as ``%3A``)
        so that no two activations share a key, whatever their ids contain."""
        return idempotency_key(self.run_id, self.node_id, self.activation)

    @property
    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    async def get(self, key: str) -> Any:
        """Shorthand for ``await ctx.context.get(key)``."""
        return await self.context.get(key)

    async def set(self, key: str, value: Any) -> None:
        """Shorthand for ``await ctx.context.set(key, value)``."""
        await self.context.set(key, value)


def idempotency_key(run_id: str, node_id: str, activation: int) -> str:
    """The key of :attr:`NodeContext.idempotency_key` for these ids: unambiguous, and
    the plain ``run:node:activation`` when no id contains ``%`` or ``:``."""
    return f"{_escape(run_id)}:{_escape(node_id)}:{activation}"


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


NodeFunction: TypeAlias = Callable[[NodeContext], Awaitable[Any] | Any]


class BaseNode(ABC):
    """A class node. ``prep`` runs once, ``exec`` is retried, ``fallback`` runs after
    the last failed attempt, ``post`` shapes the result (``exec``'s or ``fallback``'s),
    and ``recover`` cleans up after any failure (even one a fallback replaced).

    A new instance is made per activation with the node's ``params``.
    """

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self.params: Mapping[str, Any] = params or {}

    async def prep(self, ctx: NodeContext) -> Any:
        return ctx.input

    @abstractmethod
    async def exec(self, prepared: Any, ctx: NodeContext) -> Any: ...

    async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
        """Called when every attempt failed; return a replacement output or re-raise."""
        raise error

    async def post(self, result: Any, ctx: NodeContext) -> Any:
        return result

    async def recover(self, error: BaseException, ctx: NodeContext) -> None:  # noqa: B027
        """Called once after ``prep``, ``exec``, ``fallback`` or ``post`` failed (also
        when a fallback then succeeded): release what ``prep`` took. Its own failure
        is logged, never raised."""


NodeImplementation: TypeAlias = NodeFunction | type[BaseNode]
