"""One worker's link to the shared Redis: a bounded connection pool, and one rule for when Redis is down.

Every user of Redis in the tap (rate-limit counters, the plugins' ``kv.backend: redis``, hence the
response cache) goes through :class:`RedisLink`. Its rule: a command waits at most
``redis.timeout_s``; a failure marks Redis down for ``redis.retry_interval_s``, during which
:attr:`RedisLink.available` is False and callers apply their own on-error rule at once instead of
each paying the timeout; then the next command tries again (redis-py reconnects), so recovery needs no
restart. redis-py's own retries are off: one slow attempt per request is the most a request pays.

Metrics: ``gateway_tap_redis_errors_total{user}`` (failed commands by user), ``gateway_tap_redis_up``
(1 while the last command succeeded) and ``gateway_tap_redis_command_seconds{user}``.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from gateway_tap.settings import RedisSettings

log = logging.getLogger("gateway_tap.redis")

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
"""What a Redis command raises when the server is unreachable, slow or refuses it."""

__all__ = ["REDIS_ERRORS", "RedisLink", "ResponseError"]


class _Metrics:
    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.errors = Counter("gateway_tap_redis_errors_total", "Redis commands that failed (unreachable, timed out "
                              "or refused), by user.", ["user"], registry=registry)
        self.up = Gauge("gateway_tap_redis_up", "1 while Redis answers, 0 once a command failed (until one "
                        "succeeds again).", registry=registry, multiprocess_mode="livemin")
        # A loopback round trip is ~0.1 ms; 0.25 s is the default timeout.
        self.seconds = Histogram("gateway_tap_redis_command_seconds", "Redis round trips by user.", ["user"],
                                 buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 0.5, 1.0), registry=registry)

    @classmethod
    def get(cls, registry: CollectorRegistry) -> _Metrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


class RedisLink:
    """The Redis client of one worker process (created lazily: nothing connects until the first command).

    :param settings: the ``redis`` section.
    :param registry: where the ``gateway_tap_redis_*`` metrics go.
    :raises ValueError: no URL configured.
    """

    def __init__(self, settings: RedisSettings, *, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.prefix = settings.key_prefix
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.resolved_url(), max_connections=settings.max_connections, timeout=settings.timeout_s,
            socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s,
            retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=30)
        self.client: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._metrics = _Metrics.get(registry)
        self._seconds: dict[str, Any] = {}  # the histogram's child per user (labels() on every command cost ~3 us)
        self._metrics.up.set(1)
        self._down_until = 0.0
        self._failing = False
        self.last_error: str | None = None

    def key(self, name: str) -> str:
        """``name`` under this deployment's ``key_prefix``."""
        return self.prefix + name

    @property
    def available(self) -> bool:
        """False for ``retry_interval_s`` after a failure: callers apply their on-error rule without waiting."""
        return time.monotonic() >= self._down_until

    def observe(self, user: str, seconds: float) -> None:
        """A command of ``user`` succeeded after ``seconds``."""
        child = self._seconds.get(user)
        if child is None:
            child = self._seconds[user] = self._metrics.seconds.labels(user)
        child.observe(seconds)
        if self._failing:
            self._failing = False
            self._metrics.up.set(1)
            log.info("redis reachable again", extra={"user": user})

    def failed(self, user: str, exc: BaseException) -> None:
        """A command of ``user`` failed: count it and treat Redis as down for ``retry_interval_s``."""
        self._metrics.errors.labels(user).inc()
        self._down_until = time.monotonic() + self.settings.retry_interval_s
        message = f"{type(exc).__name__}: {exc}"
        if not self._failing:
            log.warning("redis unreachable (%s); retrying in %.1f s", message, self.settings.retry_interval_s,
                        extra={"user": user})
        self._failing = True
        self._metrics.up.set(0)
        self.last_error = message

    async def call(self, user: str, command: str, *args: Any) -> Any:
        """``command`` with ``args``, timed and with failures recorded (re-raised). An error answer of the
        server to the command itself (:class:`ResponseError`, e.g. a wrong type) is no outage: it is only
        re-raised."""
        start = time.perf_counter()
        try:
            result = await self.client.execute_command(command, *args)  # type: ignore[no-untyped-call]
        except ResponseError:
            raise
        except REDIS_ERRORS as exc:
            self.failed(user, exc)
            raise
        self.observe(user, time.perf_counter() - start)
        return result

    async def close(self) -> None:
        """Close the pool's connections. Safe to call twice."""
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
