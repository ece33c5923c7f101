"""Per-LLM upstream settings resolved once at start-up: URL, credential header, timeouts, prices."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from gateway_tap.plugins.chain import Chain
from gateway_tap.pricing import PriceBook
from gateway_tap.settings import LLMConfig

# Never forwarded upstream: hop-by-hop headers, the client's credentials, what aiohttp sets itself, and what a
# client claims about where it connected from (forwarding headers are only true when a trusted proxy set them;
# the tap records the peer address it saw, and the upstream has no need of the client's).
REQUEST_HEADERS_DROPPED = (
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization", "x-api-key", "accept-encoding",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port", "x-real-ip",
    "x-client-ip", "true-client-ip",
)
# Methods an LLM API is called with; anything else (TRACE, CONNECT, WebDAV's...) is refused with 405, not sent
# upstream with the tap's credential.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The tap decodes compressed upstream bodies (to account them) and re-frames the response.
RESPONSE_HEADERS_DROPPED = (
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "content-length", "content-encoding",
)


@dataclass(frozen=True, slots=True)
class Upstream:
    """One configured LLM, ready for the hot path."""

    config: LLMConfig
    chain: Chain
    base_url: str
    credential: tuple[str, str] | None
    timeout: aiohttp.ClientTimeout
    first_byte_s: float
    prices: PriceBook
    server_address: str
    server_port: int

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def vendor(self) -> str:
        return self.config.vendor

    @classmethod
    def build(cls, config: LLMConfig, chain: Chain) -> Upstream:
        secret = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        credential: tuple[str, str] | None = None
        if secret:
            credential = ("x-api-key", secret) if config.vendor == "anthropic" else \
                ("Authorization", f"Bearer {secret}")
        t = config.timeouts
        url = urlsplit(config.upstream_url)
        prices = PriceBook.for_llm(config)
        prices.warm([model for model in config.prices], datetime.now(UTC))
        return cls(
            config=config, chain=chain, base_url=config.upstream_url.rstrip("/") + "/", credential=credential,
            timeout=aiohttp.ClientTimeout(total=t.total_s, connect=t.connect_s, sock_connect=t.connect_s),
            first_byte_s=t.first_byte_s, prices=prices, server_address=url.hostname or "",
            server_port=url.port or (443 if url.scheme == "https" else 80),
        )

    def model_label(self, model: str | None, at: datetime) -> str:
        """A bounded metric label: the name of the price entry the model resolves to (its own config key, or the
        catalog's model id, so dated variants share one label), else ``other``."""
        plan = self.prices.plan(model, at=at) if model else None
        return "other" if plan is None or plan.entry == "*" else plan.entry
