"""The Redis coordination store, shared by every adapter that coordinates through Redis.

Lives once in the core behind the ``[redis]`` extra (the original copied it into
five packages). ``redis`` is imported only when a store is created, so
``import flowcraft.distributed`` works without it.

Every method is one round trip and atomic:

======================  ==============================================================
``increment``           one ``EVALSHA``: ``INCR``, then ``PEXPIRE`` if the key has no TTL
``set_if_not_exist``    ``SET key value NX PX ms``
``extend_ttl``          ``PEXPIRE key ms`` (0 for an absent key)
``delete``              ``DEL key``
``get``                 ``GET key``
======================  ==============================================================

The script (instead of ``MULTI`` + ``EXPIRE NX``) works on Redis < 7 and on
managed services that lag behind; it is loaded again if the server lost its
script cache. TTLs are sent in milliseconds, rounded up.

A store that made its client from a URL runs its commands on *lanes*: up to
``lanes`` connections held out of its own pool, one command at a time each (busy
lanes fall back to the client). ``Redis.execute_command`` checks a connection out of
the blocking pool and back in per command (a condition, a lock and a timeout each
way): about 440 Python calls per command against about 240 on a held connection,
which for a worker counting a join per job was a fifth of its CPU. A lane whose
command fails other than by Redis's refusal (a lost connection, a cancellation) is
dropped, and the command (not cancelled) runs again through the client, whose retry
policy applies as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flowcraft.distributed._redis_results import RedisResults
from flowcraft.distributed.coordination import CoordinationStore, validate_ttl_seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.connection import AbstractConnection
    from redis.commands.core import AsyncScript

__all__ = ["RedisCoordinationStore", "RedisResults"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = 'RedisCoordinationStore needs redis-py: pip install "flowcraft-core[redis]"'

# TTL only when the counter has none (just created by INCR), so increments never
# extend the counter's life, exactly like a plain INCR on a key with a TTL.
_INCREMENT_LUA = """
local n = redis.call('INCR', KEYS[1])
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""


DEFAULT_LANES = 8
"""Connections a store made from a URL holds for its commands (see the module docstring)."""


def _ttl_ms(ttl_seconds: float) -> int:
    return max(1, math.ceil(validate_ttl_seconds(ttl_seconds) * 1000))


class _Lanes:
    """Up to ``size`` connections held out of ``client``'s pool, each running one
    command (or batch) at a time; :meth:`run` returns None when none is free or can
    be taken (the caller then uses the client).

    A command is packed by hiredis when it is installed and the connections encode
    as strict UTF-8 (the same bytes; redis-py packs argument by argument in Python),
    written straight to the connection's stream, and its reply read under the
    connection's ``socket_timeout`` (redis-py's ``send_packed_command`` starts a task
    per write to time it out: a write to a socket's buffer does not block)."""

    def __init__(self, client: Redis, size: int) -> None:
        self._client = client
        self._size = size
        self._idle: list[AbstractConnection] = []
        self._taken = 0
        self._closed = False
        kwargs = client.connection_pool.connection_kwargs
        utf8 = str(kwargs.get("encoding", "utf-8")).lower() in ("utf-8", "utf8")
        strict = kwargs.get("encoding_errors", "strict") == "strict"
        self._pack: Callable[[tuple[Any, ...]], bytes] | None = (
            _hiredis_pack() if utf8 and strict else None
        )

    async def run(self, commands: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """The raw replies of ``commands``, sent together on one lane; None when no
        lane is free. Every reply is read before the first error reply is raised
        (``ResponseError``: the connection stays in step and is kept); any other
        failure drops the lane."""
        from redis.exceptions import ResponseError

        conn = await self._take()
        if conn is None:
            return None
        replies: list[Any] = []
        refused: ResponseError | None = None
        try:
            await self._send(conn, commands)
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    refused = refused or exc
                    replies.append(exc)
        except BaseException:
            await self._drop(conn)  # replies may be left unread: never reuse it
            raise
        await self._give_back(conn)
        if refused is not None:
            raise refused
        return replies

    async def _send(self, conn: AbstractConnection, commands: Sequence[tuple[Any, ...]]) -> None:
        writer = getattr(conn, "_writer", None)
        if writer is None or not conn.is_connected:
            await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        elif self._pack is not None:
            pack = self._pack
            writer.write(pack(commands[0]) if len(commands) == 1 else b"".join(map(pack, commands)))
        else:
            writer.writelines(conn.pack_commands(commands))

    async def _give_back(self, conn: AbstractConnection) -> None:
        if self._closed:
            await self._drop(conn)
        else:
            self._idle.append(conn)

    async def _take(self) -> AbstractConnection | None:
        """An idle lane, a new one while fewer than ``size`` are taken, else None."""
        if self._idle:
            return self._idle.pop()
        if self._taken >= self._size or self._closed:
            return None
        self._taken += 1
        try:
            conn: AbstractConnection = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        except BaseException:
            self._taken -= 1
            raise
        return conn

    async def _drop(self, conn: AbstractConnection) -> None:
        self._taken -= 1
        try:
            await conn.disconnect(nowait=True)
        finally:
            await self._client.connection_pool.release(conn)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)


def _hiredis_pack() -> Callable[[tuple[Any, ...]], bytes] | None:
    try:
        import hiredis
    except ImportError:
        return None
    pack: Callable[[tuple[Any, ...]], bytes] = hiredis.pack_command
    return pack


class RedisCoordinationStore:
    """A :class:`~flowcraft.distributed.coordination.CoordinationStore` on ``redis.asyncio``.

    Args:
        client: a ``redis.asyncio.Redis`` to use; it stays open after :meth:`aclose`.
            Either ``decode_responses`` setting works.
        url: a ``redis://`` or ``rediss://`` URL, used when no client is given; the
            store owns that client and :meth:`aclose` closes it.
        key_prefix: prepended to every key, so several apps or tests share a server.
        lanes: connections held for the store's commands (default 8 with ``url``, 0
            with a given client, whose pool is the caller's): see the module docstring.
        **client_kwargs: with ``url``, passed to the connection pool
            (``BlockingConnectionPool.from_url``): TLS options such as ``ssl_ca_certs``
            and ``ssl_cert_reqs``, ``password``, timeouts, ``max_connections`` (default
            50) and ``timeout`` (seconds to wait for a free connection, default 20).

    Raises:
        ImportError: redis-py is not installed.
        ValueError: neither or both of ``client`` and ``url`` are given.
    """

    def __init__(
        self,
        client: Redis | None = None,
        *,
        url: str | None = None,
        key_prefix: str = "flowcraft:",
        lanes: int | None = None,
        **client_kwargs: Any,
    ) -> None:
        try:
            import redis.asyncio as redis_asyncio
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        if (client is None) == (url is None):
            raise ValueError("pass exactly one of client= or url=")
        if client is not None and client_kwargs:
            raise ValueError("client options apply only with url=; configure the given client")
        if client is None:
            assert url is not None
            # A blocking pool makes a burst of concurrent operations wait for a
            # connection instead of failing with "Too many connections".
            pool = redis_asyncio.BlockingConnectionPool.from_url(url, **client_kwargs)
            client = redis_asyncio.Redis.from_pool(pool)
            self._owns_client = True
        else:
            self._owns_client = False
        self._client: Redis = client
        self.key_prefix = key_prefix
        self._increment: AsyncScript = client.register_script(_INCREMENT_LUA)
        if lanes is None:
            lanes = DEFAULT_LANES if self._owns_client else 0
        if lanes < 0:
            raise ValueError("lanes must be at least 0")
        # Lanes keep their connections: leave the pool at least one for the client
        # (a pool of N connections all held by lanes would make the fallback wait).
        ceiling = getattr(client.connection_pool, "max_connections", None)
        if isinstance(ceiling, int):
            lanes = min(lanes, max(0, ceiling - 1))
        self._lanes = _Lanes(client, lanes) if lanes else None
        # The URL may hold a password: log only the prefix.
        logger.debug("Redis coordination store ready (key_prefix=%r)", key_prefix)

    @classmethod
    def owned_or_given(
        cls,
        *,
        url: str | None,
        given: CoordinationStore | None,
        options: Mapping[str, Any] | None = None,
    ) -> tuple[CoordinationStore, RedisCoordinationStore | None]:
        """An adapter's coordination store: the one it was ``given``, or a new one on
        ``url`` (with client ``options``; no key prefix: the adapter prefixes its keys)
        that the adapter owns and must close: returned second. Exactly one of ``url``
        and ``given``."""
        if (given is None) == (url is None):
            raise ValueError("pass exactly one of redis_url= or coordination_store=")
        if given is not None:
            return given, None
        owned = cls(url=url, key_prefix="", **dict(options or {}))
        return owned, owned

    @property
    def client(self) -> Redis:
        """The underlying client (for health checks; keys are prefixed by this store)."""
        return self._client

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_prefix={self.key_prefix!r})"

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    async def _on_lane(self, commands: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """The replies of ``commands`` run together on a lane; None when there is no
        free lane or the lane failed (dropped: the caller sends them through the
        client). Redis refusing a command is raised."""
        if self._lanes is None:
            return None
        try:
            return await self._lanes.run(commands)
        except Exception as exc:
            from redis.exceptions import ResponseError

            if isinstance(exc, ResponseError):
                raise
            logger.debug("a Redis lane failed (%r); sending through the client", exc)
            return None

    async def _command(self, *args: Any) -> Any:
        """One command's raw reply: on a lane if one is free, else through the client."""
        replies = await self._on_lane((args,))
        if replies is not None:
            return replies[0]
        return await self._client.execute_command(*args)  # type: ignore[no-untyped-call]

    async def increment(self, key: str, ttl_seconds: float) -> int:
        """Add 1 to the counter; its TTL is set only when this call creates it."""
        from redis.exceptions import NoScriptError

        ttl = _ttl_ms(ttl_seconds)
        full = self._key(key)
        try:
            result = await self._command("EVALSHA", self._increment.sha, 1, full, ttl)
        except NoScriptError:
            # Not loaded yet, or the server lost its script cache: redis-py loads it.
            result = await self._increment(keys=[full], args=[ttl])
        return int(result)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        """``SET NX PX``: True only for the caller that created the key."""
        ttl = _ttl_ms(ttl_seconds)
        return bool(await self._command("SET", self._key(key), value, "NX", "PX", ttl))

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        """``PEXPIRE``: the key lives ``ttl_seconds`` from now; False if it is absent."""
        ttl = _ttl_ms(ttl_seconds)
        return bool(await self._command("PEXPIRE", self._key(key), ttl))

    async def delete(self, key: str) -> None:
        """``DEL``; an absent key is fine."""
        await self._command("DEL", self._key(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        """One ``DEL`` of every key (see ``coordination.delete_keys``)."""
        if keys:
            await self._command("DEL", *(self._key(key) for key in keys))

    async def get(self, key: str) -> str | None:
        """``GET``, decoded as UTF-8 when the client returns bytes."""
        value: str | bytes | None = await self._command("GET", self._key(key))
        if isinstance(value, bytes):
            return value.decode("utf-8")
        return value

    async def set_all_if_not_exist(self, items: Sequence[tuple[str, str, float]]) -> None:
        """``set_if_not_exist`` for each ``(key, value, ttl_seconds)``, sent together in
        one round trip (not atomic together; the outcomes are not returned): for writes
        nobody waits on, such as marks written behind."""
        commands = [
            ("SET", self._key(key), value, "NX", "PX", _ttl_ms(ttl)) for key, value, ttl in items
        ]
        if not commands:
            return
        if await self._on_lane(commands) is not None:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            await pipe.execute()

    async def __aenter__(self) -> RedisCoordinationStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client this store created from a URL; a given client stays open."""
        if self._lanes is not None:
            await self._lanes.aclose()
        if self._owns_client:
            await self._client.aclose()
