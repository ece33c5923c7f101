"""``redis``: the Redis server taps share state through (rate-limit counters, plugin KV, response cache)."""

from __future__ import annotations

import os

from pydantic import Field

from gateway_tap.settings.base import Section


class RedisSettings(Section):
    """One Redis (or a compatible server) every tap replica and worker connects to. Only read when something
    uses it: ``rate_limiting.mode: shared`` or a plugin with ``kv.backend: redis``."""

    url: str | None = Field(default=None, description="redis://[:password@]host:port/db (rediss:// for TLS); "
                                                      "prefer url_env when it holds a password.")
    url_env: str = Field(default="GATEWAY_TAP_REDIS_URL",
                         description="Environment variable holding the URL when url is unset.")
    key_prefix: str = Field(default="gateway-tap:", max_length=64,
                            description="Prefix of every key the taps write (several deployments may share a "
                                        "server).")
    timeout_s: float = Field(default=0.25, gt=0, le=30,
                             description="Connect and command timeout: a request waits at most this long for Redis "
                                         "before its user's on-error rule applies.")
    retry_interval_s: float = Field(default=1.0, gt=0, le=60,
                                    description="After a failure, Redis is treated as down (no request waits for "
                                                "it) and tried again after this long.")
    max_connections: int = Field(default=64, ge=1, description="Connection pool size per worker process.")

    def resolved_url(self) -> str:
        """The URL (from the setting or the environment).

        :raises ValueError: neither is set.
        """
        url = self.url or os.environ.get(self.url_env)
        if not url:
            raise ValueError(f"redis.url is unset and ${self.url_env} is empty")
        return url
