"""Budget enforcement in the tap: the built-in post-auth step, settlement, and ``GET /budget``.

:class:`BudgetGate` owns the budget store and the :class:`BudgetEnforcer` of one
worker (opened by ``create_app`` when ``budgets`` are configured, started and
stopped with the application). Per request:

1. :class:`BudgetStep` (post-auth, before or after the plugins' post-auth hooks as
   ``budget_enforcement.position`` says) estimates the request's cost
   (:func:`estimate`) and calls :meth:`BudgetEnforcer.admit`; a refusal is a 429
   ``insufficient_quota`` / ``budget_exceeded`` with ``Retry-After`` (or 503
   ``budget_store_unavailable`` when the store is down and ``on_store_error`` is
   ``fail_closed``). An admitted request carries its reservation on the Exchange.
2. When the request ends (completed, failed, streamed to the end or cut off by the
   client), the reservation is settled with the budget_usage event the tap
   publishes for it, or released when nothing was consumed, exactly once.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
import orjson
from prometheus_client import CollectorRegistry

from gateway_tap.budgets.enforcer import BudgetEnforcer, Decision
from gateway_tap.budgets.periods import Clock, period_start, utc_clock
from gateway_tap.budgets.store import BudgetStore, open_store
from gateway_tap.hooks import TapRequest
from gateway_tap.plugins.chain import HookMetrics, RequestScope
from gateway_tap.pricing import PICOS_PER_MICRO, PriceBook
from gateway_tap.proxy import errors
from gateway_tap.proxy.accounting import estimate_prompt_tokens, output_limit
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.settings import BudgetEnforcementSettings, BudgetSettings, GatewayConfig, Period
from schemas.wire import WireBudgetUsage

log = logging.getLogger(__name__)

def max_output_tokens(request: Any) -> int:
    """The completion tokens a request may produce: ``max_completion_tokens`` / ``max_tokens`` /
    ``max_output_tokens`` (the first one set, :func:`output_limit`) times ``n`` choices; 0 when none is set."""
    limit = output_limit(request)
    if limit is None:
        return 0
    n = request.get("n")
    return limit * (n if isinstance(n, int) and n > 1 else 1)


def estimate(request: Any, prices: PriceBook | None, at: datetime) -> tuple[int, int]:
    """Estimated (cost in integer micro-USD, total tokens) of a request before it is forwarded.

    Prompt tokens are the prompt's characters / 4 (the tap's own estimator), completion
    tokens the request's output limit (:func:`max_output_tokens`, 0 when unset), priced
    like the actual usage will be (the requested model's price, else ``*``) at the dearest rate of
    their direction (a cache write can cost more than plain input, reasoning more than output), rounded
    half up.
    """
    prompt = estimate_prompt_tokens(request)
    completion = max_output_tokens(request)
    model = request.get("model") if isinstance(request, dict) else None
    plan = prices.plan(model if isinstance(model, str) else None, at=at) if prices is not None else None
    if plan is None:
        return 0, prompt + completion
    rates = plan.rates_for(prompt)
    picos = prompt * max(rates.input, rates.cache_read, rates.cache_write) + completion * max(rates.output,
                                                                                              rates.reasoning)
    return (picos + PICOS_PER_MICRO // 2) // PICOS_PER_MICRO, prompt + completion


class BudgetGate:
    """One worker's budget enforcement: store + enforcer lifecycle, admission, settlement, status.

    :param config: the whole configuration (``budgets``, ``budget_enforcement``, ``llms`` for prices).
    :param store: an open store; closed by :meth:`stop`.
    :param registry: where the ``gateway_tap_budget_*`` metrics go (the tap's registry).
    :param clock: current UTC time; tests inject one to cross period boundaries.
    """

    def __init__(self, config: GatewayConfig, store: BudgetStore, *, registry: CollectorRegistry,
                 clock: Clock = utc_clock) -> None:
        self.settings = config.budget_enforcement
        self.store = store
        self.clock = clock
        self.enforcer = BudgetEnforcer(config.budgets, store, self.settings, clock=clock, registry=registry,
                                       holder=f"{config.gateway_id}/{os.getpid()}/{uuid.uuid4().hex[:8]}")

    @classmethod
    async def open(cls, config: GatewayConfig, *, registry: CollectorRegistry,
                   clock: Clock | None = None) -> BudgetGate | None:
        """A gate when budgets are configured (or may come from the admin API) and enforcement is enabled, else None.

        The store is only opened here (PostgreSQL connects lazily); the schema is
        migrated and the spend read by :meth:`start`, whose failure is handled by
        ``on_store_error`` like any later outage.

        :raises gateway_tap.budgets.store.StoreUnavailable: the SQLite file cannot be opened.
        :raises ValueError: PostgreSQL without a DSN.
        """
        # With the admin state, budgets may arrive through the API at any time.
        if not (config.budgets or config.tap.admin.enabled) or not config.budget_enforcement.enabled:
            return None
        store = await open_store(config.budget_store, migrate=False)
        return cls(config, store, registry=registry, clock=clock or utc_clock)

    async def start(self) -> None:
        """First refresh (a failure is recorded, not raised) and the background refresh."""
        await self.enforcer.start()

    async def stop(self) -> None:
        """Stop refreshing and close the store. Safe to call twice."""
        await self.enforcer.stop()
        await self.store.close()

    def reconfigure(self, budgets: Sequence[BudgetSettings], settings: BudgetEnforcementSettings) -> None:
        """New ``budgets`` / ``budget_enforcement`` from a config reload, live (``enabled`` and
        ``budget_store`` changes need a restart; ``position`` is applied when the chains are recomposed)."""
        self.settings = settings
        self.enforcer.reconfigure(budgets, settings)

    def step(self, metrics: HookMetrics) -> BudgetStep:
        """The post-auth step to put into every LLM's chain."""
        return BudgetStep(self, metrics)

    async def admit(self, req: TapRequest, ex: Exchange) -> None:
        """Admit the request (reservation on ``ex.budget``) or raise the 429/503 :class:`TapError`."""
        app_id = ex.app_id
        if app_id is None:
            return
        budgets = self.enforcer.applicable(app_id, ex.llm_id, ex.key_id)
        if not budgets:
            return
        now = self.clock()
        try:
            parsed = req.json()
        except orjson.JSONDecodeError:
            parsed = None
        cost_micros, tokens = estimate(parsed, ex.prices, now)
        decision = await self.enforcer.admit_leased(app_id, ex.llm_id, estimated_cost_micros=cost_micros,
                                                    estimated_tokens=tokens, now=now, key_id=ex.key_id)
        if not decision.allowed:
            raise _refusal(decision, now)
        ex.budget = decision.reservation
        # The events carry the period the call was counted against: the shortest of the app's budgets,
        # so the usage lands on a day inside every budget's period (the store keeps days).
        period: Period = "daily" if any(b.period == "daily" for b in budgets) else "monthly"
        ex.budget_period = (period, period_start(period, now))

    @staticmethod
    def settle(ex: Exchange, events: Sequence[msgspec.Struct]) -> None:
        """Replace the request's estimate by its budget_usage event (or release it when there is none)."""
        reservation = ex.budget
        if reservation is None or reservation.done:
            return
        usage = next((e for e in events if isinstance(e, WireBudgetUsage)), None)
        reservation.settle(usage)  # type: ignore[arg-type]  # a generated struct with the SettledUsage fields

    def report(self, app_id: str, llm_id: str | None = None, key_id: str | None = None) -> dict[str, Any]:
        """What ``GET /budget`` and the plugins' ``budget_status`` return for an app (and for the key ``key_id``:
        its own budgets too)."""
        return {"app_id": app_id, "key_id": key_id, "llm_id": llm_id, "enforced": True,
                "store_available": self.enforcer.store_available,
                "budgets": [s.to_dict() for s in self.enforcer.status(app_id, llm_id, key_id=key_id)]}

    async def status_for(self, app_id: str, llm_id: str | None = None) -> Mapping[str, Any] | None:
        """:data:`gateway_tap.services.BudgetStatusFn` for the plugins' gateway services."""
        return self.report(app_id, llm_id)


def unenforced_report(app_id: str, llm_id: str | None = None, key_id: str | None = None) -> dict[str, Any]:
    """``GET /budget`` when no budget is enforced by this tap."""
    return {"app_id": app_id, "key_id": key_id, "llm_id": llm_id, "enforced": False, "store_available": None,
            "budgets": []}


def _refusal(decision: Decision, now: datetime) -> errors.TapError:
    retry_after = max(1, math.ceil(decision.retry_after or 1))
    if decision.reason == "budget_store_unavailable":
        return errors.budget_store_unavailable(retry_after)
    b = decision.budget
    assert b is not None
    scope = (f"key {b.key_id!r} of app {b.app_id!r}" if b.key_id else f"app {b.app_id!r}") + (
        f" on LLM {b.llm_id!r}" if b.llm_id else "")
    used = []
    if b.limit_usd is not None:
        used.append(f"${b.spent_usd:.6f} of ${b.limit_usd:g} spent")
    if b.limit_tokens is not None:
        used.append(f"{b.spent_tokens} of {b.limit_tokens} tokens used")
    if retry_after >= (b.resets_at - now).total_seconds():
        detail = f"it resets at {b.resets_at.isoformat()}"
    else:
        detail = f"requests in flight hold the rest of it; retry in {retry_after} s"
    return errors.budget_exceeded(f"{scope} reached its {b.period} budget ({', '.join(used)}); {detail}",
                                  retry_after)


class BudgetStep:
    """The built-in post-auth step (a :class:`~gateway_tap.plugins.chain.Step`, not a plugin): it works on the
    :class:`Exchange` itself (the reservation rides on it) and answers with the tap's own 429/503 error."""

    __slots__ = ("_latency", "gate")

    name = "budget"

    def __init__(self, gate: BudgetGate, metrics: HookMetrics) -> None:
        self.gate = gate
        self._latency = metrics.seconds.labels(self.name, "post_auth")

    async def run(self, arg: Any, scope: RequestScope) -> None:
        """:raises gateway_tap.proxy.errors.TapError: the budget refuses the request."""
        assert isinstance(scope, Exchange) and isinstance(arg, TapRequest)
        start = time.perf_counter()
        try:
            await self.gate.admit(arg, scope)
        finally:
            self._latency.observe(time.perf_counter() - start)
