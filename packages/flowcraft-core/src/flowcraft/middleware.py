"""Middleware: code around every node execution (tracing, metrics, auth, audit)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flowcraft.node import NodeContext, NodeResult

__all__ = ["Middleware", "NextCall"]

NextCall = Callable[[], Awaitable[NodeResult]]


class Middleware:
    """Override any of the three. ``around`` wraps the whole attempt loop of one
    activation; ``before``/``after`` see each activation's start and result."""

    async def before(self, ctx: NodeContext) -> None:
        return None

    async def after(self, ctx: NodeContext, result: NodeResult) -> None:
        return None

    async def around(self, ctx: NodeContext, call_next: NextCall) -> NodeResult:
        return await call_next()
