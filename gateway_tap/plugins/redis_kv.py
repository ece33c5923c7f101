"""The plugins' key-value store on Redis (``kv.backend: redis``): shared by every worker of every tap.

The same API and semantics as the memory and SQLite stores (:class:`~gateway_tap.hooks.KeyValueStore`):
values are ``bytes`` (stored as they are, behind one marker byte) or anything orjson serialises (stored as
its JSON text); ``ttl_s`` expires a key (Redis ``PX``); ``incr`` is atomic across every tap (one Lua call:
``INCRBY``, and the TTL set only when it created the key, so a counter keeps the expiry of its first write).

Bounds: a value larger than ``kv.max_bytes`` is refused with :class:`OverflowError`; the store as a whole is
bounded by the server's ``maxmemory`` and its eviction policy (``allkeys-lru`` for a cache), not per
plugin. Keys are ``<redis.key_prefix>kv:<plugin>:<key>``.

Redis unreachable: every call raises :class:`KVUnavailable` at once while the link is marked down (never
waiting ``redis.timeout_s`` per call), so the plugin applies its own rule (the response cache: a miss, and
the answer is not stored); calls succeed again as soon as Redis answers, without a restart.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway_tap.redis_link import REDIS_ERRORS, RedisLink, ResponseError

_BYTES = b"\x00"  # JSON text never starts with a NUL byte
_INCR = """
local existed = redis.call('EXISTS', KEYS[1])
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
if existed == 0 and tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""


class KVUnavailable(ConnectionError):
    """Redis cannot be reached (or timed out): the call did not happen."""


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return _BYTES + bytes(value)
    return orjson.dumps(value)


def _decode(raw: bytes | None) -> Any:
    if raw is None:
        return None
    if raw[:1] == _BYTES:
        return raw[1:]
    return orjson.loads(raw)


class RedisKV:
    """One plugin's namespace on Redis (the :class:`~gateway_tap.hooks.KeyValueStore` API).

    :param link: the worker's Redis link.
    :param namespace: the plugin's name.
    :param max_bytes: the largest value accepted (plus its key).
    """

    def __init__(self, link: RedisLink, namespace: str, max_bytes: int) -> None:
        self._link = link
        self._prefix = link.key(f"kv:{namespace}:")
        self.max_bytes = max_bytes
        self._user = f"kv:{namespace}"
        self._incr = link.client.register_script(_INCR)

    async def _call(self, command: str, *args: Any) -> Any:
        if not self._link.available:
            raise KVUnavailable(f"redis unreachable: {self._link.last_error}")
        try:
            return await self._link.call(self._user, command, *args)
        except ResponseError as exc:
            raise ValueError(f"redis refused {command}: {exc}") from exc
        except REDIS_ERRORS as exc:
            raise KVUnavailable(f"redis unreachable: {type(exc).__name__}: {exc}") from exc

    async def get(self, key: str) -> Any:
        return _decode(await self._call("GET", self._prefix + key))

    async def set(self, key: str, value: Any, ttl_s: float | None = None) -> None:
        """Store ``value`` (expiring after ``ttl_s``).

        :raises OverflowError: the entry is larger than ``max_bytes``.
        """
        blob = _encode(value)
        if len(key.encode()) + len(blob) > self.max_bytes:
            raise OverflowError(f"entry of {len(blob)} bytes is larger than the store's max_bytes ({self.max_bytes})")
        if ttl_s:
            await self._call("SET", self._prefix + key, blob, "PX", max(1, round(ttl_s * 1000)))
        else:
            await self._call("SET", self._prefix + key, blob)

    async def delete(self, key: str) -> None:
        await self._call("DEL", self._prefix + key)

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        if not self._link.available:
            raise KVUnavailable(f"redis unreachable: {self._link.last_error}")
        ttl_ms = max(1, round(ttl_s * 1000)) if ttl_s else 0
        try:
            return int(await self._incr([self._prefix + key], [int(amount), ttl_ms]))
        except ResponseError as exc:  # e.g. the value is not an integer
            raise ValueError(f"redis refused incr of {key!r}: {exc}") from exc
        except REDIS_ERRORS as exc:
            self._link.failed(self._user, exc)
            raise KVUnavailable(f"redis unreachable: {type(exc).__name__}: {exc}") from exc
