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
managed services that lag behind; redis-py resends it once if the server lost
its script cache. TTLs are sent in milliseconds, rounded up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flowcraft.distributed._redis_results import RedisResults
from flowcraft.distributed.coordination import CoordinationStore, validate_ttl_seconds

if TYPE_CHECKING:
    from redis.asyncio import Redis
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


def _ttl_ms(ttl_seconds: float) -> int:
    return max(1, math.ceil(validate_ttl_seconds(ttl_seconds) * 1000))


class RedisCoordinationStore:
    """A :class:`~flowcraft.distributed.coordination.CoordinationStore` on ``redis.asyncio``.

    Args:
        client: a ``redis.asyncio.Redis`` to use; it stays open after :meth:`aclose`.
            Either ``decode_responses`` setting works.
        url: a ``redis://`` or ``rediss://`` URL, used when no client is given; the
            store owns that client and :meth:`aclose` closes it.
        key_prefix: prepended to every key, so several apps or tests share a server.
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

    async def increment(self, key: str, ttl_seconds: float) -> int:
        """Add 1 to the counter; its TTL is set only when this call creates it."""
        ttl = _ttl_ms(ttl_seconds)
        result = await self._increment(keys=[self._key(key)], args=[ttl])
        return int(result)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: float) -> bool:
        """``SET NX PX``: True only for the caller that created the key."""
        ttl = _ttl_ms(ttl_seconds)
        return bool(await self._client.set(self._key(key), value, nx=True, px=ttl))

    async def extend_ttl(self, key: str, ttl_seconds: float) -> bool:
        """``PEXPIRE``: the key lives ``ttl_seconds`` from now; False if it is absent."""
        ttl = _ttl_ms(ttl_seconds)
        return bool(await self._client.pexpire(self._key(key), ttl))

    async def delete(self, key: str) -> None:
        """``DEL``; an absent key is fine."""
        await self._client.delete(self._key(key))

    async def get(self, key: str) -> str | None:
        """``GET``, decoded as UTF-8 when the client returns bytes."""
        value: str | bytes | None = await self._client.get(self._key(key))
        if isinstance(value, bytes):
            return value.decode("utf-8")
        return value

    async def __aenter__(self) -> RedisCoordinationStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client this store created from a URL; a given client stays open."""
        if self._owns_client:
            await self._client.aclose()
