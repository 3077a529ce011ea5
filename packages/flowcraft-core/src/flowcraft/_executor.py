"""Runs one activation of one node: middleware, attempts with backoff, timeout, fallback.

Shared by the in-memory runtime and the distributed adapter. It never commits:
it returns a ``NodeResult`` and leaves the node's writes in its ``TrackingContext``
for the caller to commit atomically with the output.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_fixed,
)

from flowcraft.errors import NodeExecutionError, NodeTimeoutError, UnknownNodeError
from flowcraft.events import FlowEvent, emit
from flowcraft.node import BaseNode, NodeContext, NodeImplementation, NodeResult

if TYPE_CHECKING:
    from flowcraft.blueprint import NodeDefinition
    from flowcraft.context import TrackingContext
    from flowcraft.events import EventBus
    from flowcraft.middleware import Middleware

logger = logging.getLogger("flowcraft.runtime")


@dataclass(slots=True)
class Awaiting(NodeResult):
    """Returned by a wait node: the activation pauses until resumed.

    ``event`` names what it waits for (``signal`` resumes it; None: only ``resume``
    does, the human-approval wait), ``token`` correlates a signal to this wait without
    the run's id, and after ``timeout_ms`` the wait resolves by itself with the action
    ``timeout`` (None: it waits for ever)."""

    event: str | None = None
    token: str | None = None
    timeout_ms: float | None = None

    @property
    def timed(self) -> bool:
        """Whether the wait has anything beyond a plain pause (an event or a timeout)."""
        return self.event is not None or self.token is not None or self.timeout_ms is not None


@dataclass(slots=True)
class Sleeping(NodeResult):
    """Returned by a sleep node: resolve with ``output`` after ``duration_ms``. The
    runtime decides where the time passes: in the process, or (distributed, or past
    ``RuntimeOptions.max_inline_sleep_ms``) durably in the run's state."""

    duration_ms: float = 0.0


def _retryable(exc: BaseException) -> bool:
    """Only ordinary errors are retried: never cancellation, exit or interrupt."""
    return isinstance(exc, Exception) and not isinstance(exc, UnknownNodeError)


class NodeExecutor:
    def __init__(
        self,
        registry: Mapping[str, NodeImplementation],
        *,
        middleware: tuple[Middleware, ...] = (),
        event_bus: EventBus | None = None,
    ) -> None:
        self.registry = registry
        self.middleware = middleware
        self.event_bus = event_bus

    def implementation(self, node: NodeDefinition) -> NodeImplementation:
        try:
            return self.registry[node.uses]
        except KeyError:
            raise UnknownNodeError(
                f"node {node.id!r} uses {node.uses!r}, which is not in the registry"
            ) from None

    async def execute(
        self,
        node: NodeDefinition,
        ctx: NodeContext,
        *,
        max_attempts: int | None = None,
        fallback: NodeDefinition | None = None,
    ) -> NodeResult:
        """One activation. Raises ``NodeExecutionError`` after the last attempt and fallback.

        ``fallback`` is the node named by ``config.fallback``: it runs with the same
        input when every attempt failed, and its result stands for this node's.
        """
        impl = self.implementation(node)
        attempts = max_attempts if max_attempts is not None else node.max_attempts
        if not self.middleware:
            if attempts <= 1 and node.config is None and not isinstance(impl, type):
                return await self.call_once(node, impl, ctx, fallback)
            return await self._run(node, impl, ctx, attempts, fallback)

        async def innermost() -> NodeResult:
            return await self._run(node, impl, ctx, attempts, fallback)

        call: Callable[[], Awaitable[NodeResult]] = innermost
        for mw in reversed(self.middleware):
            call = _wrap(mw, ctx, call)
        for mw in self.middleware:
            await mw.before(ctx)
        result = await call()
        for mw in self.middleware:
            await mw.after(ctx, result)
        return result

    async def call_once(
        self,
        node: NodeDefinition,
        impl: NodeImplementation,
        ctx: NodeContext,
        fallback: NodeDefinition | None,
    ) -> NodeResult:
        """The common case without the layers: one attempt of a function node."""
        try:
            out = impl(ctx)  # type: ignore[arg-type]
            if inspect.isawaitable(out):
                out = await out
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _discard(ctx)
            return await self._fallback(node, None, ctx, exc, fallback)
        return out if isinstance(out, NodeResult) else NodeResult(output=out)

    async def _run(
        self,
        node: NodeDefinition,
        impl: NodeImplementation,
        ctx: NodeContext,
        attempts: int,
        fallback: NodeDefinition | None,
    ) -> NodeResult:
        if not isinstance(impl, type):
            try:
                if attempts <= 1:
                    return await self._attempt(node, impl, None, None, ctx)
                return await self._with_retries(node, impl, None, None, ctx, attempts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return await self._fallback(node, None, ctx, exc, fallback)
        instance = impl(node.params)
        error: Exception | None = None
        try:
            try:
                prepared = await instance.prep(ctx)
            except Exception as exc:
                raise _failure(node, exc) from exc
            try:
                if attempts <= 1:
                    return await self._attempt(node, impl, instance, prepared, ctx)
                return await self._with_retries(node, impl, instance, prepared, ctx, attempts)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
                return await self._fallback(node, instance, ctx, exc, fallback)
        except Exception as exc:
            error = error or exc
            raise
        finally:
            if error is not None and type(instance).recover is not BaseNode.recover:
                await _recover(node, instance, error, ctx)

    async def _with_retries(
        self,
        node: NodeDefinition,
        impl: NodeImplementation,
        instance: BaseNode | None,
        prepared: Any,
        ctx: NodeContext,
        attempts: int,
    ) -> NodeResult:
        config = node.config
        delay = (config.retry_delay if config else 0) / 1000
        wait = (
            wait_fixed(delay)
            if config is None or config.retry_backoff == "fixed"
            else wait_exponential(multiplier=delay, min=delay, max=max(delay * 64, delay))
        )
        first = ctx.attempt

        async def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.info("node %s attempt %d failed: %r; retrying", node.id, ctx.attempt, exc)
            await emit(
                self.event_bus,
                FlowEvent(
                    "node:retry",
                    ctx.run_id,
                    node.id,
                    {"attempt": ctx.attempt, "activation": ctx.activation, "error": repr(exc)},
                ),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait,
            retry=retry_if_exception(_retryable),
            reraise=True,
            before_sleep=before_sleep,
        )
        async for attempt in retrying:
            with attempt:
                ctx.attempt = first + attempt.retry_state.attempt_number - 1
                return await self._attempt(node, impl, instance, prepared, ctx)
        raise AssertionError("unreachable: tenacity reraises")  # pragma: no cover

    async def _attempt(
        self,
        node: NodeDefinition,
        impl: NodeImplementation,
        instance: BaseNode | None,
        prepared: Any,
        ctx: NodeContext,
    ) -> NodeResult:
        timeout = node.config.timeout if node.config else None
        try:
            if timeout is None:
                return await self._call(impl, instance, prepared, ctx)
            try:
                async with asyncio.timeout(timeout / 1000):
                    return await self._call(impl, instance, prepared, ctx)
            except TimeoutError:
                raise NodeTimeoutError(
                    f"node {node.id!r} timed out after {timeout:g} ms", node_id=node.id
                ) from None
        except BaseException:
            _discard(ctx)
            raise

    @staticmethod
    async def _call(
        impl: NodeImplementation, instance: BaseNode | None, prepared: Any, ctx: NodeContext
    ) -> NodeResult:
        if instance is not None:
            out = await instance.exec(prepared, ctx)
            out = await instance.post(out, ctx)
        else:
            out = impl(ctx)  # type: ignore[arg-type]
            if inspect.isawaitable(out):
                out = await out
        return out if isinstance(out, NodeResult) else NodeResult(output=out)

    async def _fallback(
        self,
        node: NodeDefinition,
        instance: BaseNode | None,
        ctx: NodeContext,
        exc: Exception,
        fallback_def: NodeDefinition | None,
    ) -> NodeResult:
        if instance is not None and type(instance).fallback is not BaseNode.fallback:
            await emit(self.event_bus, FlowEvent("node:fallback", ctx.run_id, node.id))
            try:
                out = await instance.fallback(exc, ctx)
                # ``post`` shapes a fallback's result too, as in the original.
                out = await instance.post(out, ctx)
            except Exception as again:
                raise _failure(node, again) from again
            return out if isinstance(out, NodeResult) else NodeResult(output=out)
        if fallback_def is not None:
            await emit(
                self.event_bus,
                FlowEvent("node:fallback", ctx.run_id, node.id, {"fallback": fallback_def.id}),
            )
            logger.info("node %s failed (%r); running fallback %s", node.id, exc, fallback_def.id)
            impl = self.implementation(fallback_def)
            fb_instance = impl(fallback_def.params) if isinstance(impl, type) else None
            try:
                prepared = await fb_instance.prep(ctx) if fb_instance is not None else None
                return await self._attempt(fallback_def, impl, fb_instance, prepared, ctx)
            except Exception as again:
                raise _failure(node, again) from again
        raise _failure(node, exc) from exc


def _failure(node: NodeDefinition, exc: BaseException) -> NodeExecutionError:
    if isinstance(exc, NodeExecutionError):
        return exc
    return NodeExecutionError(f"node {node.id!r} failed: {exc!r}", node_id=node.id, cause=exc)


async def _recover(
    node: NodeDefinition, instance: BaseNode, error: Exception, ctx: NodeContext
) -> None:
    """``recover`` after any failure of a class node; its own failure is only logged."""
    try:
        await instance.recover(error, ctx)
    except Exception:
        logger.warning("node %s: recover() failed after %r", node.id, error, exc_info=True)


def _discard(ctx: NodeContext) -> None:
    discard = getattr(ctx.context, "discard", None)
    if discard is not None:
        discard()


def _wrap(mw: Middleware, ctx: NodeContext, inner: Callable[[], Awaitable[NodeResult]]) -> Any:
    async def call() -> NodeResult:
        return await mw.around(ctx, inner)

    return call


def tracking(ctx: NodeContext) -> TrackingContext:
    from flowcraft.context import TrackingContext

    assert isinstance(ctx.context, TrackingContext)
    return ctx.context
