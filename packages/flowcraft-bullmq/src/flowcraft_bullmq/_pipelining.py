"""Automatic pipelining for ``redis.asyncio``: commands issued by concurrent tasks in
the same event-loop turn travel together in one pipeline (one connection checkout,
one write, one read loop).

A worker runs many jobs at once and each awaits a handful of independent commands;
sent one by one, redis-py spends far more CPU per command (connection checkout,
bookkeeping, a socket write and read wake-up) than Redis does. Batching them is the
same idea as ioredis' ``enableAutoPipelining`` which Node BullMQ users turn on.

Semantics are those of separate commands: each caller gets its own reply or its own
error (its arguments are encoded before they join a batch, so one caller's bad
argument fails that caller alone); commands of one batch are not atomic together
(no MULTI). Blocking commands
and connection-state commands bypass the batch.

A batch is written and read on one pooled connection without redis-py's
``Pipeline`` object, and under one read deadline (``socket_timeout``) for the whole
batch instead of one asyncio timeout per reply: per-reply timeouts alone were 7% of
a worker's CPU. Like a redis-py pipeline, a batch whose connection fails is retried
whole under the connection's retry policy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio.connection import AbstractConnection

__all__ = ["AutoPipelineRedis"]

logger = logging.getLogger("flowcraft.bullmq")

_MAX_BATCH = 256
# Commands that block a connection or change its state must not share a pipeline.
_DIRECT = frozenset(
    {
        "BZPOPMIN", "BZPOPMAX", "BLPOP", "BRPOP", "BLMOVE", "BRPOPLPUSH", "BLMPOP",
        "BZMPOP", "XREAD", "XREADGROUP", "WAIT", "CLIENT", "HELLO", "AUTH", "SELECT",
        "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR", "MULTI", "EXEC", "WATCH",
        "UNWATCH", "DISCARD", "QUIT", "RESET", "INFO", "SCRIPT",
    }
)  # fmt: skip


# Command options that steer reading, not the response callback.
_NOT_FOR_CALLBACKS = frozenset({NEVER_DECODE, EMPTY_RESPONSE, "keys"})


class AutoPipelineRedis(Redis):
    """A ``redis.asyncio.Redis`` that pipelines concurrent commands automatically."""

    _pending: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]]
    _flush_scheduled: bool
    _senders: set[asyncio.Task[None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending = []
        self._flush_scheduled = False
        self._senders = set()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        name = name.decode() if isinstance(name, bytes) else str(name)
        if self.single_connection_client or name.split(" ", 1)[0].upper() in _DIRECT:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, options, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending:
            batch = self._pending[:_MAX_BATCH]
            del self._pending[:_MAX_BATCH]
            task = asyncio.ensure_future(self._send(batch))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    async def _send(
        self, batch: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]]
    ) -> None:
        pool = self.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                results = await conn.retry.call_with_retry(
                    lambda: self._exchange(conn, batch), lambda _error: conn.disconnect()
                )
            finally:
                await pool.release(conn)
        except BaseException as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else _Lost(exc))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _exchange(
        self,
        conn: AbstractConnection,
        batch: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]],
    ) -> list[Any]:
        """Write the batch, read every reply (a command's error reply is its result)."""
        try:
            packed = conn.pack_commands([args for args, _, _ in batch])
        except Exception:
            packed = _pack_each(conn, batch)
        await conn.send_packed_command(packed)
        results: list[Any] = []
        try:
            async with asyncio.timeout(conn.socket_timeout):
                for args, options, _ in batch:
                    results.append(await self._reply(conn, args[0], options))
        except TimeoutError:
            await conn.disconnect(nowait=True)
            raise RedisTimeoutError(f"timeout reading {len(batch)} pipelined replies") from None
        return results

    async def _reply(self, conn: AbstractConnection, command: Any, options: dict[str, Any]) -> Any:
        """One reply, shaped by the client's response callback as ``parse_response`` does."""
        try:
            reply = await conn.read_response(
                disable_decoding=NEVER_DECODE in options, timeout=math.inf
            )
        except ResponseError as exc:
            return options.get(EMPTY_RESPONSE, exc)
        callback = self.response_callbacks.get(command)
        if callback is None:
            return reply
        extra = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
        value = callback(reply, **extra)
        return await value if inspect.isawaitable(value) else value

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._senders:
            await asyncio.gather(*list(self._senders), return_exceptions=True)
        await super().aclose(close_connection_pool)


def _pack_each(
    conn: AbstractConnection,
    batch: list[tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]],
) -> list[bytes]:
    """The batch packed command by command, after packing it whole failed: a command
    whose arguments cannot be encoded (a str that is not valid Unicode, a None) fails
    its own caller only and leaves the batch, which the others still form."""
    packed: list[bytes] = []
    kept = []
    for item in batch:
        try:
            packed += conn.pack_command(*item[0])
        except Exception as exc:
            if not item[2].done():
                item[2].set_exception(exc)
            continue
        kept.append(item)
    batch[:] = kept
    return packed


class _Lost(RedisConnectionError):
    """The batch carrying this command was interrupted (its sender was cancelled)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"pipelined command interrupted: {cause!r}")
