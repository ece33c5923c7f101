"""Rate limits in the tap: the built-in post-auth step, the OpenAI-style 429 and headers, and settlement.

:class:`RateLimitGate` owns one worker's limiter (``local``: counters in the process; ``shared``: Redis,
through the worker's :class:`~gateway_tap.redis_link.RedisLink`). Per request:

1. :class:`RateLimitStep` (post-auth, before or after the plugins' post-auth hooks as
   ``rate_limiting.position`` says; before the budget step when both sit on the same side) resolves the
   counters of the request's app, app x LLM, app x LLM x model and key, estimates its tokens like the budget
   step (prompt characters / 4 plus the output limit) and asks the limiter. Refused: 429 with
   ``{"error": {"type": "requests" | "tokens", "code": "rate_limit_exceeded", ...}}``, ``Retry-After`` (whole
   seconds) and ``retry-after-ms``; Redis unreachable with ``on_redis_error: fail_closed``: 503
   ``rate_limit_unavailable``.
2. Every answer to a request that passed a limit (or was refused by one) carries OpenAI's
   ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` headers.
3. When the request ends, its admission is settled with the tokens the upstream actually used (0 when the
   upstream was not called and nothing was charged), and its concurrency claim ends; a cancelled handler
   settles it too.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from gateway_tap.fast_metrics import FastCounter, FastHistogram
from gateway_tap.hooks import TapRequest
from gateway_tap.plugins.chain import HookMetrics, RequestScope
from gateway_tap.proxy import errors
from gateway_tap.proxy.accounting import estimate_prompt_tokens
from gateway_tap.proxy.budget import max_output_tokens
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.ratelimits import Decision, Limits, LocalLimiter, RateLimiter, SharedLimiter
from gateway_tap.redis_link import RedisLink
from gateway_tap.settings import GatewayConfig, RateLimitingSettings, RateLimitSettings

_PER = {"requests": "requests per minute (RPM)", "tokens": "tokens per minute (TPM)",
        "concurrent": "requests in flight"}


class _Metrics:
    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter("gateway_tap_ratelimit_decisions_total", "Rate-limit admission decisions by result.",
                                 ["result"], registry=registry)
        self.limited = Counter("gateway_tap_ratelimit_limited_total",
                               "Requests refused by a rate limit, by the limit's scope kind (app, app_llm, "
                               "app_model, key) and counter (requests, tokens, concurrent).",
                               ["scope", "kind"], registry=registry)

    @classmethod
    def get(cls, registry: CollectorRegistry) -> _Metrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


def _scope_kind(scope: str) -> str:
    if scope.startswith("key="):
        return "key"
    return "app_model" if ",model=" in scope else "app_llm" if ",llm=" in scope else "app"


def estimate_tokens(parsed: Any) -> int:
    """A request's tokens before it is forwarded: prompt characters / 4 plus its output limit (the budget
    step's estimate, without the prices)."""
    return estimate_prompt_tokens(parsed) + max_output_tokens(parsed)


class RateLimitGate:
    """One worker's rate limiting: the limits in force, the limiter, the metrics.

    :param link: the worker's Redis link (required in ``shared`` mode; not closed here).
    """

    def __init__(self, limits: Sequence[RateLimitSettings], settings: RateLimitingSettings, *,
                 registry: CollectorRegistry, link: RedisLink | None = None) -> None:
        self.settings = settings
        self.limits = Limits(limits)
        self.limiter: RateLimiter
        if settings.mode == "shared":
            if link is None:
                raise ValueError("rate_limiting.mode is shared but no redis link was given")
            self.limiter = SharedLimiter(link, on_error=settings.on_redis_error, lease_s=settings.concurrency_lease_s)
        else:
            self.limiter = LocalLimiter()
        self._metrics = _Metrics.get(registry)
        self._decisions = {result: FastCounter(self._metrics.decisions.labels(result))
                           for result in ("allowed", "limited", "redis_error_open", "redis_error_closed")}

    @staticmethod
    def wanted(config: GatewayConfig) -> bool:
        """Whether a worker of ``config`` runs the step: whenever ``rate_limiting.enabled``, so limits added later
        (a reload, the admin API) apply without a restart; with none for a request the step costs one set lookup."""
        return config.rate_limiting.enabled

    def reconfigure(self, limits: Sequence[RateLimitSettings], settings: RateLimitingSettings) -> None:
        """New ``rate_limits`` live (a config reload, an admin change). Counters are kept by scope, so a changed
        limit applies to what was already counted; ``mode`` needs a restart."""
        self.limits = Limits(limits)
        self.settings = settings.model_copy(update={"mode": self.settings.mode})

    def step(self, metrics: HookMetrics) -> RateLimitStep:
        """The post-auth step to put into every LLM's chain."""
        return RateLimitStep(self, metrics)

    async def admit(self, req: TapRequest, ex: Exchange) -> None:
        """Admit the request (its admission on ``ex.ratelimit``) or raise the 429/503 :class:`TapError`."""
        limits = self.limits
        key = limits.key_name(ex.key_hash, ex.key_id)
        if not limits.applies(ex.app_id, key):
            return
        plan = limits.plan(ex.app_id, key, ex.llm_id, ex.model)
        if not plan:
            return
        tokens = 0
        if any(c.kind == "tokens" for c in plan):
            try:
                tokens = estimate_tokens(req.json())
            except orjson.JSONDecodeError:
                tokens = 0
        limiter = self.limiter
        decision = (limiter.check(plan, tokens) if isinstance(limiter, LocalLimiter)  # no coroutine to drive
                    else await limiter.admit(plan, ex.request_id, tokens))
        self._decisions[decision.outcome].inc()
        if decision.states:
            ex.ratelimit_headers = decision.headers()
        if decision.allowed:
            ex.ratelimit = decision.admission
            return
        raise self._refusal(decision, ex)

    def _refusal(self, decision: Decision, ex: Exchange) -> errors.TapError:
        retry_s = max(decision.retry_after_s, 0.001)
        if decision.blocked is None:
            return errors.rate_limit_unavailable(max(1, math.ceil(retry_s)))
        counter = decision.blocked
        self._metrics.limited.labels(_scope_kind(counter.scope), counter.kind).inc()
        state = next(s for s in decision.states if s.counter is counter)
        if counter.scope.startswith("key="):
            who = f"key {ex.key_id or counter.scope[4:23]}"  # its id, never its whole hash
        else:
            who = counter.scope.replace("app=", "app ").replace(",llm=", " on LLM ").replace(",model=", " for model ")
        if counter.kind == "concurrent":
            used = f"Limit {counter.limit}, in flight {counter.limit - max(0, state.remaining)}"
        else:
            used = f"Limit {counter.limit}, Remaining {max(0, state.remaining)}, Requested {decision.requested}"
        message = (f"Rate limit reached for {who} on {_PER[counter.kind]}: {used}. "
                   f"Please try again in {retry_s:.3g}s.")
        headers = dict(ex.ratelimit_headers or {})
        headers["retry-after-ms"] = str(math.ceil(retry_s * 1000))
        return errors.rate_limited("tokens" if counter.kind == "tokens" else "requests", message,
                                   max(1, math.ceil(retry_s)), headers)

    @staticmethod
    def settle(ex: Exchange) -> None:
        """End the request's admission with the tokens it actually used (see the module docstring)."""
        admission = ex.ratelimit
        if admission is None:
            return
        ex.ratelimit = None
        usage = ex.usage
        used = ex.upstream_start is not None or (ex.served_by is not None and ex.charge)
        admission.settle(usage.total_tokens if used and usage is not None else None)

    def report(self) -> dict[str, Any]:
        """What ``status`` shows: the mode and the limits in force."""
        return {"enabled": True, "mode": self.settings.mode,
                "limits": [e.model_dump(exclude_none=True) for e in self.limits.entries]}

    async def close(self) -> None:
        """Send pending settlements (shared mode)."""
        await self.limiter.close()


class RateLimitStep:
    """The built-in post-auth step (a :class:`~gateway_tap.plugins.chain.Step`): refuses with the tap's own
    429/503 error; the admission rides on the :class:`Exchange`."""

    __slots__ = ("_latency", "gate")

    name = "ratelimit"

    def __init__(self, gate: RateLimitGate, metrics: HookMetrics) -> None:
        self.gate = gate
        self._latency = FastHistogram(metrics.seconds.labels(self.name, "post_auth"))

    async def run(self, arg: Any, scope: RequestScope) -> None:
        """:raises gateway_tap.proxy.errors.TapError: a limit refuses the request."""
        assert isinstance(scope, Exchange) and isinstance(arg, TapRequest)
        start = time.perf_counter()
        try:
            await self.gate.admit(arg, scope)
        finally:
            self._latency.observe(time.perf_counter() - start)
