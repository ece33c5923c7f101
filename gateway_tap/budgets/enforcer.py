"""Budget enforcement for the tap: an in-memory spend view and the admission decision.

What the enforcer knows about an app's spend in the current period is

* ``store``: daily totals read from the budget store every ``staleness_s``
  (a background task; :meth:`BudgetEnforcer.admit` never waits for the database);
* ``pending``: the actual usage of requests this tap finished whose
  budget_usage event is not in the store yet, tracked by event id until a
  refresh sees that id in the ledger (read in the same snapshot as the totals,
  so nothing is counted twice or missed, whatever the pipeline lag);
* ``reserved``: the estimated cost/tokens of requests admitted and still in flight.

Admission rule for a hard budget with limit ``L`` and a request with estimate ``e``:
admit iff ``store + pending + reserved < L`` and ``store + pending + reserved + e <= L``.

Overspend bound (one tap): the final spend exceeds ``L`` by at most the sum of
``max(0, actual_i - estimate_i)`` over the requests in flight when the last
request was admitted (that one included). With ``e = 0`` that is the cost of
the requests in flight at once; with estimates that never undershoot it is 0.

Key budgets (``budgets[].key_id``) limit the requests made with one key of an app. Every view above is
kept per *scope*: ``(app_id, "")`` for the whole app (every key's requests, and those a plugin authenticated),
``(app_id, key_id)`` for a key with a budget of its own; a request counts in the scope of each budget that
applies to it, and must pass all of them.

Across taps (``budget_enforcement.leases``, the default): a hard budget's requests are also admitted
only against a *lease*, a slice of the budget's room granted by the store's database
(:meth:`BudgetStore.claim`, one claimer per app at a time). Each worker keeps its claims there (per app x
LLM x day: unused lease + estimates in flight + usage not yet recorded) and a lease is granted only while
the ledger's totals plus every worker's claims stay within every budget. Settling moves an estimate's error
into the lease (an overshoot is taken from it), so a worker's claim only outgrows what was granted by the
overshoot of its requests. Bound with leases: the sum of ``max(0, actual - estimate)`` over the requests on
any tap that were in flight, or finished less than ``staleness_s`` earlier, when the last request was
admitted: it does not grow with pipeline lag or the number of taps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import socket
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from datetime import time as dt_time
from typing import Any, Literal, NamedTuple, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from gateway_tap.budgets.periods import (
    Clock,
    micros_to_usd,
    period_end,
    period_start,
    usage_day,
    usd_to_micros,
    utc_clock,
)
from gateway_tap.budgets.store import BudgetStore, BudgetStoreError, Claim, ClaimKey, DailyTotal, Scope
from gateway_tap.settings import BudgetEnforcementSettings, BudgetSettings, Period

log = logging.getLogger("gateway_tap.budgets")

Reason = Literal["budget_exceeded", "budget_store_unavailable"]


class SettledUsage(Protocol):
    """What settling reads of a budget_usage event: the model (:class:`schemas.BudgetUsage`) or the
    struct the tap publishes (:data:`schemas.wire.WireBudgetUsage`)."""

    @property
    def id(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def llm_id(self) -> str: ...
    @property
    def period(self) -> Period: ...
    @property
    def period_start(self) -> date: ...
    @property
    def emitted_at(self) -> datetime: ...
    @property
    def cost(self) -> float: ...
    @property
    def cost_micros(self) -> int | None: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


_Key = tuple[str, date]  # (llm_id, day) inside one scope


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """One budget's state for the current period (what ``GET /budget`` returns per budget)."""

    app_id: str
    llm_id: str | None
    period: Period
    mode: Literal["hard", "soft"]
    period_start: date
    resets_at: datetime
    limit_usd: float | None
    limit_tokens: int | None
    spent_usd: float
    spent_tokens: int
    reserved_usd: float
    reserved_tokens: int
    exceeded: bool
    key_id: str | None = None

    @property
    def used_ratio(self) -> float:
        """Spend / limit (the larger of the USD and token ratios); a zero limit counts as fully used."""
        ratios = [0.0]
        for spent, limit in ((self.spent_usd, self.limit_usd), (float(self.spent_tokens), self.limit_tokens)):
            if limit is not None:
                ratios.append(spent / limit if limit > 0 else 1.0)
        return max(ratios)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field plus ``used_ratio`` and ``percent_used`` (two decimals)."""
        ratio = self.used_ratio
        return {
            "used_ratio": ratio, "percent_used": round(ratio * 100, 2),
            "app_id": self.app_id, "key_id": self.key_id, "llm_id": self.llm_id, "period": self.period,
            "mode": self.mode,
            "period_start": self.period_start.isoformat(), "resets_at": self.resets_at.isoformat(),
            "limit_usd": self.limit_usd, "limit_tokens": self.limit_tokens, "spent_usd": self.spent_usd,
            "spent_tokens": self.spent_tokens, "reserved_usd": self.reserved_usd,
            "reserved_tokens": self.reserved_tokens, "exceeded": self.exceeded,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Result of :meth:`BudgetEnforcer.admit` / :meth:`BudgetEnforcer.check`.

    :param allowed: forward the request.
    :param reason: why not (``budget_exceeded``: answer 429 ``insufficient_quota``;
        ``budget_store_unavailable``: fail_closed while the store is down).
    :param retry_after: seconds for the ``Retry-After`` header when not allowed.
    :param budget: the budget that blocked (None when allowed).
    :param budgets: every budget that applies to this app x LLM (from :meth:`~BudgetEnforcer.check` and
        on refusals; empty when :meth:`~BudgetEnforcer.admit` admits).
    :param reservation: when admitted by :meth:`~BudgetEnforcer.admit`: settle it when the request ends.
    :param store_stale: decided without a successful store refresh within the grace period.
    """

    allowed: bool
    reason: Reason | None = None
    retry_after: float | None = None
    budget: BudgetStatus | None = None
    budgets: tuple[BudgetStatus, ...] = ()
    reservation: Reservation | None = None
    store_stale: bool = False


class Reservation:
    """An admitted request's claim on its budgets. Call :meth:`settle` exactly once when it ends."""

    __slots__ = ("_enforcer", "_id", "app_id", "cost_micros", "day", "done", "leased", "llm_id", "scopes", "tokens")

    def __init__(self, enforcer: BudgetEnforcer | None, rid: int, app_id: str, llm_id: str, day: date,
                 cost_micros: int, tokens: int, scopes: tuple[Scope, ...] = (),
                 leased: tuple[Scope, ...] = ()) -> None:
        self._enforcer = enforcer
        self._id = rid
        self.app_id, self.llm_id, self.day = app_id, llm_id, day
        self.cost_micros, self.tokens = cost_micros, tokens
        self.scopes = scopes  # where the request counts: its app, and its key when the key has a budget
        self.leased = leased  # scopes whose lease it drew from: its settlement corrects those leases
        self.done = enforcer is None

    def settle(self, usage: SettledUsage | None) -> None:
        """Replace the estimate by the actual usage (the budget_usage event published for this request).

        ``None`` (nothing consumed, request failed) just releases the estimate. Idempotent.
        """
        if self.done:
            return
        self.done = True
        assert self._enforcer is not None
        self._enforcer._settle(self, usage)

    def release(self) -> None:
        """Drop the estimate without recording usage (same as ``settle(None)``)."""
        self.settle(None)


class _Sums:
    """cost/tokens per (llm_id, day) for one app."""

    __slots__ = ("by_key",)

    def __init__(self) -> None:
        self.by_key: dict[_Key, list[int]] = {}

    def add(self, key: _Key, cost: int, tokens: int) -> None:
        entry = self.by_key.get(key)
        if entry is None:
            self.by_key[key] = [cost, tokens]
            return
        entry[0] += cost
        entry[1] += tokens
        if not entry[0] and not entry[1]:
            del self.by_key[key]

    def get(self, key: _Key) -> tuple[int, int]:
        entry = self.by_key.get(key)
        return (entry[0], entry[1]) if entry is not None else (0, 0)

    def total(self, llm_id: str | None, start: date, end: date) -> tuple[int, int]:
        cost = tokens = 0
        for (llm, day), (c, t) in self.by_key.items():
            if (llm_id is None or llm == llm_id) and start <= day < end:
                cost += c
                tokens += t
        return cost, tokens


@dataclass(frozen=True, slots=True)
class _Measure:
    """A budget's current period and spend, in integers."""

    start: date
    resets_at: datetime
    spent_cost: int
    spent_tokens: int
    reserved_cost: int
    reserved_tokens: int


@functools.lru_cache(maxsize=64)
def _bounds(period: Period, day: date) -> tuple[date, date, datetime]:
    """(start, exclusive end, reset time) of the period containing ``day``."""
    start = period_start(period, day)
    end = period_end(period, start)
    return start, end, datetime.combine(end, dt_time(0), tzinfo=UTC)


@dataclass(slots=True)
class _Pending:
    scopes: tuple[Scope, ...]
    key: _Key
    cost: int
    tokens: int
    settled_at: float


class _Metrics:
    # Weak keys: a registry's id can be reused once it is garbage collected (tests build many).
    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter("gateway_tap_budget_decisions_total",
                                 "Budget admission decisions by result.", ["result"], registry=registry)
        self.store_errors = Counter("gateway_tap_budget_store_errors_total",
                                    "Failed budget cache refreshes.", registry=registry)
        # A SQLite refresh takes well under a millisecond, a PostgreSQL one a few; 10 s is a store in trouble.
        self.refresh = Histogram("gateway_tap_budget_refresh_seconds", "Budget cache refresh duration.",
                                 buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=registry)
        self.last_refresh = Gauge("gateway_tap_budget_last_refresh_timestamp_seconds",
                                  "Unix time of the last successful budget cache refresh.", registry=registry)
        self.inflight = Gauge("gateway_tap_budget_inflight_reservations",
                              "Admitted requests still in flight.", registry=registry)
        self.claims = Counter("gateway_tap_budget_leases_total",
                              "Lease requests to the store (hard budgets across taps) by result: granted, refused "
                              "(no room left), error (the store failed).", ["result"], registry=registry)
        self.pending = Gauge("gateway_tap_budget_pending_usages",
                             "Finished requests whose usage the store has not recorded yet.", registry=registry)
        # livemax: with several workers the highest live view wins (each sees the store plus its own spend).
        self.used_ratio = Gauge("gateway_tap_budget_used_ratio",
                                "Spend / limit of each budget in its current period (the larger of USD and tokens); "
                                "llm is empty for app-wide budgets.", ["app", "llm", "period"], registry=registry,
                                multiprocess_mode="livemax")

    @classmethod
    def get(cls, registry: CollectorRegistry) -> _Metrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics


class _Plan(NamedTuple):
    """What applies to a request of one app x LLM x key, resolved once per combination and configuration."""

    budgets: tuple[BudgetSettings, ...]
    scopes: tuple[Scope, ...]
    """Where the request counts: the scope of each budget, once each."""
    hard: tuple[Scope, ...]
    """The scopes with a hard budget: the request draws from the lease of each."""
    limited: tuple[tuple[bool, bool], ...]
    """Per scope of :attr:`hard`: whether its hard budgets limit USD, tokens."""


def _plan_of(budgets: tuple[BudgetSettings, ...]) -> _Plan:
    hard = tuple(dict.fromkeys(b.scope for b in budgets if b.mode == "hard"))
    limited = tuple((any(b.limit_usd is not None for b in budgets if b.mode == "hard" and b.scope == s),
                     any(b.limit_tokens is not None for b in budgets if b.mode == "hard" and b.scope == s))
                    for s in hard)
    return _Plan(budgets, tuple(dict.fromkeys(b.scope for b in budgets)), hard, limited)


_NEEDS_LEASE = Decision(False)
"""Internal answer of ``_decide``: admitted if this worker's leases covered the estimate, which they do not."""

_GRANTS_PER_ADMISSION = 8
"""Lease requests one admission may make (one per scope, again when concurrent admissions drew a new lease first)."""


class BudgetEnforcer:
    """Admission decisions against the configured budgets. Create one per tap process.

    :param budgets: the ``budgets`` config section.
    :param store: an open :class:`BudgetStore` (the enforcer applies migrations on its first refresh).
    :param settings: the ``budget_enforcement`` config section (staleness, on_store_error, ...).
    :param clock: current UTC time; inject a fixed clock in tests to cross period boundaries.
    :param registry: prometheus registry for the ``gateway_tap_budget_*`` metrics.
    :param holder: this worker's name in the store's claims (with ``settings.leases``; default host/pid/random).

    Use ``await start()`` (first refresh, then a background refresh every
    ``staleness_s``) and ``await stop()``, or ``async with``. :meth:`admit`,
    :meth:`check` and :meth:`status` are synchronous and never touch the database.
    """

    def __init__(self, budgets: Sequence[BudgetSettings], store: BudgetStore,
                 settings: BudgetEnforcementSettings | None = None, *, clock: Clock = utc_clock,
                 registry: CollectorRegistry = REGISTRY, holder: str | None = None) -> None:
        self.store = store
        self.settings = settings or BudgetEnforcementSettings()
        self._clock = clock
        self._metrics = _Metrics.get(registry)
        self.budgets: tuple[BudgetSettings, ...] = ()
        self._by_app: dict[str, list[BudgetSettings]] = {}
        self._key_scopes: frozenset[Scope] = frozenset()
        self._hard_scopes: frozenset[Scope] = frozenset()
        self._plans: dict[tuple[str, str | None, str | None], _Plan] = {}
        self._limit_micros: dict[int, int] = {}
        self.reconfigure(budgets)
        self._stored: dict[Scope, _Sums] = {}
        self._local: dict[Scope, _Sums] = {}  # pending (settled, not yet in the store)
        self._reserved: dict[Scope, _Sums] = {}  # in flight
        self._pending: dict[str, _Pending] = {}
        self._lease: dict[Scope, _Sums] = {}  # granted and not drawn yet (negative: overshoot beyond it)
        self._drawn: set[tuple[Scope, _Key]] = set()  # leases drawn from since the last refresh
        self._claim_locks: dict[str, asyncio.Lock] = {}  # one lease request per app at a time
        self._claims_written = asyncio.Lock()  # this worker's claim rows are rewritten by one call at a time
        self.holder = holder or f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._inflight = 0
        self._ids = itertools.count(1)
        self._migrated = False
        self._ever_refreshed = False
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._metrics.inflight.set_function(lambda: self._inflight)
        self._metrics.pending.set_function(lambda: len(self._pending))
        self._count = {result: self._metrics.decisions.labels(result)
                       for result in ("allowed", "blocked", "store_error_open", "store_error_closed")}
        self._leases = {result: self._metrics.claims.labels(result) for result in ("granted", "refused", "error")}

    def reconfigure(self, budgets: Sequence[BudgetSettings], settings: BudgetEnforcementSettings | None = None) -> None:
        """Take new budgets (and enforcement settings) live, e.g. on a config reload.

        Decisions from now on use them; the spend views (store, pending, reserved) are per app (or key) and
        LLM, not per budget, so they carry over; reservations in flight settle as usual.
        """
        by_app: dict[str, list[BudgetSettings]] = {}
        limits: dict[int, int] = {}
        for budget in budgets:
            by_app.setdefault(budget.app_id, []).append(budget)
            if budget.limit_usd is not None:
                limits[id(budget)] = usd_to_micros(budget.limit_usd)
        gone = {_gauge_labels(b) for b in self.budgets if b.key_id is None} - {
            _gauge_labels(b) for b in budgets if b.key_id is None}
        self.budgets, self._by_app, self._limit_micros = tuple(budgets), by_app, limits
        self._key_scopes = frozenset(b.scope for b in budgets if b.key_id is not None)
        self._hard_scopes = frozenset(b.scope for b in budgets if b.mode == "hard")
        self._plans = {}
        if settings is not None:
            self.settings = settings
        for labels in gone:
            with contextlib.suppress(KeyError):
                self._metrics.used_ratio.remove(*labels)

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Try a first refresh (a failure is recorded, not raised) and start the background refresh."""
        if self._task is not None:
            return
        await self._refresh_once()
        self._task = asyncio.create_task(self._refresh_loop(), name="budget-cache-refresh")

    async def stop(self) -> None:
        """Stop the background refresh and give unused leases back (the claims of requests in flight and of usage
        not recorded yet stay until they expire). Safe to call twice; does not close the store."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.leasing and self._ever_refreshed:
                self._lease.clear()
                with contextlib.suppress(BudgetStoreError):
                    await self._put_claims()

    @property
    def leasing(self) -> bool:
        """Whether hard budgets are admitted against leases (``budget_enforcement.leases``)."""
        return self.settings.leases

    async def __aenter__(self) -> BudgetEnforcer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def refresh(self) -> None:
        """Read the store now (the background task calls this every ``staleness_s``).

        :raises BudgetStoreError: the store failed; the failure is recorded (metrics, ``last_error``,
            :attr:`store_available`) and the cache keeps its previous content.
        """
        started = time.perf_counter()
        try:
            if not self._migrated:
                await self.store.migrate()
                self._migrated = True
            since = period_start("monthly", self._clock())  # every daily period lies inside its month
            snap = await self.store.snapshot(since, list(self._by_app), list(self._pending),
                                             sorted(self._key_scopes))
        except BudgetStoreError as exc:
            self._store_failed(str(exc))
            raise
        stored: dict[Scope, _Sums] = {}
        for row in snap.totals:
            stored.setdefault(row.scope, _Sums()).add((row.llm_id, row.day), row.cost_micros, row.total_tokens)
        self._stored = stored
        for event_id in snap.recorded_ids:
            self._forget_pending(event_id)
        expiry = time.monotonic() - self.settings.pending_ttl_s
        for event_id in [e for e, p in self._pending.items() if p.settled_at < expiry]:
            self._forget_pending(event_id)
        if self.leasing:
            self._return_unused_leases()
            try:
                await self._put_claims()
            except BudgetStoreError as exc:
                self._store_failed(str(exc))
                raise
        self._ever_refreshed = True
        self._failing_since = None
        self.last_error = None
        self._metrics.refresh.observe(time.perf_counter() - started)
        self._metrics.last_refresh.set(time.time())

    async def _refresh_once(self) -> None:
        try:
            await self.refresh()
        except BudgetStoreError:
            pass  # recorded by refresh(); enforcement goes on with the last known data
        except Exception as exc:  # a bug must not stop the refresh loop: log, count, keep going
            log.exception("budget cache refresh failed")
            self._store_failed(f"{type(exc).__name__}: {exc}")
        self.update_gauges()

    def update_gauges(self) -> None:
        """Set ``gateway_tap_budget_used_ratio`` for every app budget (the refresh loop calls this). Key budgets
        have no series: one per key would grow without bound (``GET /budget`` and ``status`` show them)."""
        now = self._clock()
        for budget in self.budgets:
            if budget.key_id is None:
                status = self._status(budget, now)
                self._metrics.used_ratio.labels(*_gauge_labels(budget)).set(status.used_ratio)

    def _store_failed(self, message: str) -> None:
        if self.last_error != message:
            log.warning("budget store unreachable (%s); on_store_error=%s", message, self.settings.on_store_error)
        self.last_error = message
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self._metrics.store_errors.inc()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.staleness_s)
            await self._refresh_once()

    @property
    def store_available(self) -> bool:
        """False before the first successful refresh and once refreshes kept failing for ``store_error_grace_s``."""
        if not self._ever_refreshed:
            return False
        return self._failing_since is None or time.monotonic() - self._failing_since < self.settings.store_error_grace_s

    # -- decisions ---------------------------------------------------------------------------------------
    def applicable(self, app_id: str, llm_id: str | None, key_id: str | None = None) -> tuple[BudgetSettings, ...]:
        """Budgets that apply to a call of ``llm_id`` by ``app_id`` with the key ``key_id`` (its id; None: no key):
        the app's, and the key's own (resolved once per combination and configuration)."""
        return self._plan(app_id, llm_id, key_id).budgets

    def _plan(self, app_id: str, llm_id: str | None, key_id: str | None) -> _Plan:
        key = (app_id, llm_id, key_id)
        found = self._plans.get(key)
        if found is None:
            found = _plan_of(tuple(b for b in self._by_app.get(app_id, ())
                                   if (b.llm_id is None or llm_id is None or b.llm_id == llm_id)
                                   and (b.key_id is None or b.key_id == key_id)))
            if len(self._plans) < 10_000:  # app and key ids come from auth plugins too: keep the table bounded
                self._plans[key] = found
        return found

    def status(self, app_id: str, llm_id: str | None = None, now: datetime | None = None,
               key_id: str | None = None) -> list[BudgetStatus]:
        """Spend, limits and reset time of the app's budgets (all of them when ``llm_id`` is None), and of the
        key ``key_id``'s own."""
        now = now or self._clock()
        return [self._status(b, now) for b in self.applicable(app_id, llm_id, key_id)]

    def check(self, app_id: str, llm_id: str, now: datetime | None = None, key_id: str | None = None) -> Decision:
        """Would a request be admitted now? Reserves nothing (use :meth:`admit` in the request path)."""
        return self._decide(app_id, llm_id, key_id, 0, 0, now or self._clock(), reserve=False)

    def admit(self, app_id: str, llm_id: str, *, estimated_cost_usd: float = 0.0, estimated_tokens: int = 0,
              now: datetime | None = None, estimated_cost_micros: int | None = None,
              key_id: str | None = None) -> Decision:
        """Decide and, when allowed, reserve the estimate until ``decision.reservation.settle(...)``.

        Check and reservation happen in one synchronous step, so concurrent
        requests cannot all see the same remaining budget. The estimate is given in USD or, from the
        tap's precomputed price tables, in integer micro-USD (``estimated_cost_micros`` wins).
        ``key_id`` is the id of the key the request was made with (its own budgets apply too).
        An admitted decision carries no ``budgets`` statuses (the hot path needs none; :meth:`check`
        and refusals have them).
        """
        cost = usd_to_micros(estimated_cost_usd) if estimated_cost_micros is None else estimated_cost_micros
        return self._decide(app_id, llm_id, key_id, cost, estimated_tokens, now or self._clock(), reserve=True)

    async def admit_leased(self, app_id: str, llm_id: str, *, estimated_cost_micros: int, estimated_tokens: int,
                           now: datetime | None = None, key_id: str | None = None) -> Decision:
        """:meth:`admit` for a tap among others: a hard budget's request is admitted only against this worker's
        leases (the app's, and the key's when the key has a hard budget of its own), asking the store for more
        when one does not cover the estimate (the only case that waits for the database; concurrent requests of
        one app share one such call). Without leases the same as :meth:`admit`.

        When the store cannot grant (unreachable), the request is decided like without leases
        (``on_store_error``, this worker's own view); a lease already granted keeps admitting during an outage.
        """
        now = now or self._clock()
        cost, tokens = estimated_cost_micros, estimated_tokens
        decision = self._decide(app_id, llm_id, key_id, cost, tokens, now, True, lease=self.leasing)
        if decision is not _NEEDS_LEASE:
            return decision
        lock = self._claim_locks.get(app_id)
        if lock is None:
            lock = self._claim_locks[app_id] = asyncio.Lock()
        room: tuple[BudgetSettings, bool] | None = None
        async with lock:
            for _ in range(_GRANTS_PER_ADMISSION):
                # A request that held the lock before may have leased enough; a grant is decided at once, still
                # under the lock, so nobody of this app drew the new lease first.
                decision = self._decide(app_id, llm_id, key_id, cost, tokens, now, True, lease=True)
                if decision is not _NEEDS_LEASE:
                    return decision
                scope = self._uncovered(self._plan(app_id, llm_id, key_id), (llm_id, now.date()), cost, tokens)
                assert scope is not None  # _decide said a lease does not cover it
                try:
                    room = await self._grant(app_id, llm_id, scope, now, cost, tokens)
                except BudgetStoreError as exc:
                    self._leases["error"].inc()
                    self._store_failed(str(exc))
                    return self._decide(app_id, llm_id, key_id, cost, tokens, now, True, lease=False)
                if room is not None:
                    break
        # No room: the budget is spent, or other workers hold the rest (they return what they do not use).
        self._count["blocked"].inc()
        budgets = self.applicable(app_id, llm_id, key_id)
        statuses = tuple(self._status(b, now) for b in budgets)
        if room is None:  # concurrent admissions kept drawing every lease granted: retry after the next refresh
            room = (next(b for b in budgets if b.mode == "hard"), False)
        blocking, reset = room
        index = next(i for i, b in enumerate(budgets) if b is blocking)
        retry = (max(1, math.ceil((statuses[index].resets_at - now).total_seconds())) if reset
                 else max(1, math.ceil(self.settings.staleness_s)))
        return Decision(False, "budget_exceeded", retry, statuses[index], statuses)

    def _decide(self, app_id: str, llm_id: str, key_id: str | None, est_cost: int, est_tokens: int,
                now: datetime, reserve: bool, *, lease: bool = False) -> Decision:
        plan = self._plan(app_id, llm_id, key_id)
        budgets = plan.budgets
        stale = bool(budgets) and not self.store_available
        hard = bool(plan.hard)
        key = (llm_id, now.date())
        leased = lease and hard and reserve
        if leased and stale:
            # A lease granted before is good during an outage too; without one, the on_store_error rule decides.
            leased = self._uncovered(plan, key, est_cost, est_tokens) is None
        if stale and not leased and self.settings.on_store_error == "fail_closed" and hard:
            self._count["store_error_closed"].inc()
            every = tuple(self._status(b, now) for b in budgets)
            return Decision(False, "budget_store_unavailable", max(1, math.ceil(self.settings.staleness_s)),
                            every[0], every, store_stale=True)
        for i, budget in enumerate(budgets):
            if budget.mode != "hard":
                continue
            retry = self._blocks(budget, self._measure(budget, now), est_cost, est_tokens, now)
            if retry is not None:
                self._count["blocked"].inc()
                statuses = tuple(self._status(b, now) for b in budgets)
                return Decision(False, "budget_exceeded", retry, statuses[i], statuses, store_stale=stale)
        if leased and self._uncovered(plan, key, est_cost, est_tokens) is not None:
            return _NEEDS_LEASE
        self._count["store_error_open" if stale and not leased else "allowed"].inc()
        if reserve:
            reservation = self._reserve(app_id, llm_id, now.date(), plan, est_cost, est_tokens, leased=leased)
            return Decision(True, reservation=reservation, store_stale=stale)
        return Decision(True, budgets=tuple(self._status(b, now) for b in budgets), store_stale=stale)

    def _uncovered(self, plan: _Plan, key: _Key, cost: int, tokens: int) -> Scope | None:
        """The first hard scope of ``plan`` whose lease does not cover the estimate, or None."""
        for scope, (usd, toks) in zip(plan.hard, plan.limited, strict=True):
            sums = self._lease.get(scope)
            lease_cost, lease_tokens = sums.get(key) if sums is not None else (0, 0)
            if (usd and lease_cost < cost) or (toks and lease_tokens < tokens):
                return scope
        return None

    # -- leases across taps --------------------------------------------------------------------------------
    def _claims(self, app_id: str | None = None) -> dict[ClaimKey, tuple[int, int]]:
        """This worker's claims (per scope x LLM x day): unused lease (never below 0) + in flight + not recorded.
        Only scopes with a hard budget are claimed."""
        out: dict[ClaimKey, list[int]] = {}
        for views, clamp in ((self._lease, True), (self._reserved, False), (self._local, False)):
            for scope, sums in views.items():
                if scope not in self._hard_scopes or (app_id is not None and scope[0] != app_id):
                    continue
                for (llm, day), (cost, tokens) in sums.by_key.items():
                    entry = out.setdefault((scope[0], scope[1], llm, day), [0, 0])
                    entry[0] += max(0, cost) if clamp else cost
                    entry[1] += max(0, tokens) if clamp else tokens
        return {k: (v[0], v[1]) for k, v in out.items() if v[0] > 0 or v[1] > 0}

    async def _put_claims(self) -> None:
        async with self._claims_written:
            now_s = time.time()
            await self.store.put_claims(self.holder, self._claims(), now_s=now_s,
                                        expires_s=now_s + self.settings.claim_ttl_s)

    def _return_unused_leases(self) -> None:
        """A lease not drawn from since the last refresh goes back (another worker may need the room)."""
        for scope, sums in self._lease.items():
            for key in [k for k, (c, t) in sums.by_key.items()
                        if (scope, k) not in self._drawn and (c > 0 or t > 0)]:
                cost, tokens = sums.get(key)
                sums.add(key, -max(0, cost), -max(0, tokens))
        self._drawn.clear()

    async def _grant(self, app_id: str, llm_id: str, scope: Scope, now: datetime, need_cost: int,
                     need_tokens: int) -> tuple[BudgetSettings, bool] | None:
        """Ask the store for a lease of ``scope`` (the app, or one of its keys) covering (``need_cost``,
        ``need_tokens``) on today's ``llm_id``.

        :returns: None when granted (the lease is updated), else the budget without room and whether only
            its period's reset can help (the ledger alone fills it).
        :raises BudgetStoreError: the store failed.
        """
        day = now.date()
        key = (llm_id, day)
        budgets = [b for b in self.applicable(app_id, llm_id, scope[1] or None)
                   if b.mode == "hard" and b.scope == scope]
        since = period_start("monthly", now)  # every daily period lies inside its month
        fraction = self.settings.lease_fraction
        outcome: list[Any] = []

        def decide(totals: list[DailyTotal], others: list[Claim]) -> dict[ClaimKey, tuple[int, int]]:
            mine = self._claims(app_id)
            lease_cost, lease_tokens = self._lease[scope].get(key) if scope in self._lease else (0, 0)
            short_cost, short_tokens = need_cost - max(0, lease_cost), need_tokens - max(0, lease_tokens)
            grant = [0, 0]
            blocked: tuple[BudgetSettings, bool] | None = None
            rooms: list[int | None] = [None, None]
            for budget in budgets:
                start, end, _ = _bounds(budget.period, day)

                def inside(llm: str, d: date, budget: BudgetSettings = budget, start: date = start,
                           end: date = end) -> bool:
                    return (budget.llm_id is None or llm == budget.llm_id) and start <= d < end

                ledger = [0, 0]
                for row in totals:
                    if row.scope == scope and inside(row.llm_id, row.day):
                        ledger[0] += row.cost_micros
                        ledger[1] += row.total_tokens
                claimed = [ledger[0], ledger[1]]
                for c in others:
                    if c.scope == scope and inside(c.llm_id, c.day):
                        claimed[0] += c.cost_micros
                        claimed[1] += c.tokens
                for (app, key_id, llm, d), (cost, tokens) in mine.items():
                    if (app, key_id) == scope and inside(llm, d):
                        claimed[0] += cost
                        claimed[1] += tokens
                limits: tuple[int | None, int | None] = (self._limit_micros.get(id(budget)), budget.limit_tokens)
                for dim, short in ((0, short_cost), (1, short_tokens)):
                    limit = limits[dim]
                    if limit is None:
                        continue
                    room = limit - claimed[dim]
                    current = rooms[dim]
                    rooms[dim] = room if current is None else min(current, room)
                    if room < short and blocked is None:
                        blocked = (budget, ledger[dim] >= limit or ledger[dim] + max(short, 0) > limit)
            if blocked is None:
                for dim, short in ((0, short_cost), (1, short_tokens)):
                    left = rooms[dim]
                    if left is not None and left > 0:
                        grant[dim] = min(left, max(short, math.ceil(left * fraction)))
                if grant != [0, 0]:
                    claim_key = (scope[0], scope[1], llm_id, day)
                    entry = mine.get(claim_key, (0, 0))
                    mine[claim_key] = (entry[0] + grant[0], entry[1] + grant[1])
            outcome[:] = [blocked, grant]
            return mine

        async with self._claims_written:
            now_s = time.time()
            await self.store.claim(self.holder, app_id, since, decide, now_s=now_s,
                                   expires_s=now_s + self.settings.claim_ttl_s,
                                   key_ids=(scope[1],) if scope[1] else ())
        blocked, grant = outcome
        if blocked is not None:
            self._leases["refused"].inc()
            return blocked  # type: ignore[no-any-return]
        sums = self._lease.setdefault(scope, _Sums())
        cost, tokens = sums.get(key)
        # An overshoot beyond the lease was already claimed as usage: the new lease starts from zero.
        sums.add(key, grant[0] - min(0, cost), grant[1] - min(0, tokens))
        self._leases["granted"].inc()
        return None

    def _blocks(self, budget: BudgetSettings, m: _Measure, est_cost: int, est_tokens: int,
                now: datetime) -> float | None:
        """Retry-After seconds if ``budget`` blocks this request, else None."""
        checks = []
        if budget.limit_usd is not None:
            checks.append((m.spent_cost, m.reserved_cost, self._limit_micros[id(budget)], est_cost))
        if budget.limit_tokens is not None:
            checks.append((m.spent_tokens, m.reserved_tokens, budget.limit_tokens, est_tokens))
        for spent, reserved, limit, estimate in checks:
            if spent >= limit or spent + reserved >= limit or spent + reserved + estimate > limit:
                if spent >= limit or spent + estimate > limit:  # only the period reset can help
                    return max(1, math.ceil((m.resets_at - now).total_seconds()))
                return max(1, math.ceil(self.settings.staleness_s))  # in-flight requests may settle lower
        return None

    def _measure(self, budget: BudgetSettings, now: datetime) -> _Measure:
        start, end, reset = _bounds(budget.period, now.date())
        scope = budget.scope
        s_cost, s_tokens = self._stored[scope].total(budget.llm_id, start, end) if scope in self._stored else (0, 0)
        p_cost, p_tokens = self._local[scope].total(budget.llm_id, start, end) if scope in self._local else (0, 0)
        r_cost, r_tokens = (self._reserved[scope].total(budget.llm_id, start, end)
                            if scope in self._reserved else (0, 0))
        return _Measure(start, reset, s_cost + p_cost, s_tokens + p_tokens, r_cost, r_tokens)

    def _status(self, budget: BudgetSettings, now: datetime, m: _Measure | None = None) -> BudgetStatus:
        m = m or self._measure(budget, now)
        exceeded = ((budget.limit_usd is not None and m.spent_cost >= self._limit_micros[id(budget)])
                    or (budget.limit_tokens is not None and m.spent_tokens >= budget.limit_tokens))
        return BudgetStatus(
            app_id=budget.app_id, llm_id=budget.llm_id, period=budget.period, mode=budget.mode,
            period_start=m.start, resets_at=m.resets_at, limit_usd=budget.limit_usd,
            limit_tokens=budget.limit_tokens, spent_usd=micros_to_usd(m.spent_cost), spent_tokens=m.spent_tokens,
            reserved_usd=micros_to_usd(m.reserved_cost), reserved_tokens=m.reserved_tokens, exceeded=exceeded,
            key_id=budget.key_id)

    # -- reservations ------------------------------------------------------------------------------------
    def _reserve(self, app_id: str, llm_id: str, day: date, plan: _Plan, cost: int, tokens: int, *,
                 leased: bool = False) -> Reservation:
        if not plan.budgets:  # no budget applies: nothing to track
            return Reservation(None, 0, app_id, llm_id, date.min, 0, 0)
        scopes = plan.scopes
        drawn = plan.hard if leased else ()
        reservation = Reservation(self, next(self._ids), app_id, llm_id, day, cost, tokens, scopes, drawn)
        key = (llm_id, day)
        for scope in scopes:
            self._reserved.setdefault(scope, _Sums()).add(key, cost, tokens)
        for scope in drawn:
            self._lease.setdefault(scope, _Sums()).add(key, -cost, -tokens)
            self._drawn.add((scope, key))
        self._inflight += 1
        return reservation

    def _settle(self, reservation: Reservation, usage: SettledUsage | None) -> None:
        reserved_key = (reservation.llm_id, reservation.day)
        for scope in reservation.scopes:
            self._reserved[scope].add(reserved_key, -reservation.cost_micros, -reservation.tokens)
        self._inflight -= 1
        if usage is None or usage.id in self._pending:
            for scope in reservation.leased:  # nothing consumed: the estimate goes back to the lease
                self._lease[scope].add(reserved_key, reservation.cost_micros, reservation.tokens)
            return
        key = (usage.llm_id, usage_day(usage.period, usage.period_start, usage.emitted_at))
        cost = usage.cost_micros if usage.cost_micros is not None else usd_to_micros(usage.cost)
        tokens = usage.total_tokens or usage.prompt_tokens + usage.completion_tokens
        for scope in reservation.leased:  # the estimate's error goes to the lease: an overshoot is taken from it
            self._lease[scope].add(reserved_key, reservation.cost_micros - cost, reservation.tokens - tokens)
        self._pending[usage.id] = _Pending(reservation.scopes, key, cost, tokens, time.monotonic())
        for scope in reservation.scopes:
            self._local.setdefault(scope, _Sums()).add(key, cost, tokens)

    def _forget_pending(self, event_id: str) -> None:
        pending = self._pending.pop(event_id, None)
        if pending is not None:
            for scope in pending.scopes:
                self._local[scope].add(pending.key, -pending.cost, -pending.tokens)


def _gauge_labels(budget: BudgetSettings) -> tuple[str, str, str]:
    return budget.app_id, budget.llm_id or "", budget.period
