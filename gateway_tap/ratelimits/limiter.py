"""Rate limits: which counters a request passes, the token-bucket rule, and the per-worker (``local``) limiter.

Every ``rate_limits`` entry gives up to three counters for its scope (an app, an app x LLM, an app x LLM x
model, or a key): ``requests`` and ``tokens`` per minute, and ``concurrent`` requests in flight. A request
passes the counters of its app, its app x LLM, its app x LLM x model and its key (:meth:`Limits.plan`,
resolved once per combination and configuration).

The rule, the same in both modes (:mod:`.shared` runs it in Redis):

* a per-minute counter is a token bucket: ``used`` drains at ``limit / 60`` per second down to 0, and
  ``limit - used`` is what is left; a request of cost ``c`` (1 request, or its estimated tokens) passes iff
  ``min(c, limit)`` is left (a request larger than the whole limit waits for an empty bucket instead of never
  passing), and adds ``c`` to ``used`` (which may exceed the limit: that debt drains before anything else
  passes). A new limit (reload, admin API) applies to what is already used;
* a concurrency counter passes iff fewer than ``limit`` admitted requests are still in flight;
* all counters pass or the request is refused and nothing is taken (``Retry-After`` is the time until the
  blocking counter would pass, 1 s for concurrency).

When the request ends, :meth:`Admission.settle` replaces the token estimate by the actual usage (the
difference is taken from, or added to, ``used``, never below 0) and ends its
concurrency claim. A refused request takes nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from gateway_tap.settings import RateLimitKind, RateLimitSettings

_KINDS: tuple[tuple[RateLimitKind, str], ...] = (
    ("requests", "requests_per_minute"), ("tokens", "tokens_per_minute"), ("concurrent", "max_concurrent"))


@dataclass(frozen=True, slots=True)
class Counter:
    """One limited quantity of one scope: ``name`` is ``<scope>:<kind>`` (the Redis key after the prefix)."""

    name: str
    scope: str
    kind: RateLimitKind
    limit: int

    @property
    def per_minute(self) -> bool:
        return self.kind != "concurrent"


Plan = tuple[Counter, ...]
"""The counters one request passes, in a fixed order (app, app x LLM, app x LLM x model, key)."""


def counters_of(entry: RateLimitSettings) -> Plan:
    """The counters of one ``rate_limits`` entry."""
    out = []
    for kind, field in _KINDS:
        limit = getattr(entry, field)
        if limit is not None:
            out.append(Counter(f"{entry.scope}:{kind}", entry.scope, kind, int(limit)))
    return tuple(out)


class Limits:
    """The configured ``rate_limits``, indexed for :meth:`plan`."""

    _MAX_PLANS = 10_000  # app ids may come from auth plugins and models from request bodies: keep it bounded

    def __init__(self, entries: Sequence[RateLimitSettings]) -> None:
        self.entries = tuple(entries)
        self._scopes: dict[str, Plan] = {e.scope: counters_of(e) for e in entries}
        self._apps = frozenset(e.app_id for e in entries if e.app_id is not None)
        self._keys = frozenset(e.key_id for e in entries if e.key_id is not None)
        self._plans: dict[tuple[str | None, str | None, str, str | None], Plan] = {}

    def __bool__(self) -> bool:
        return bool(self.entries)

    def key_name(self, key_hash: str | None, key_id: str | None) -> str | None:
        """How the limits name a key, if any limit does: by its full ``sha256:<hex>`` hash (how the admin API stores a
        key's own limits) or by its id (``apps[].key_ids``, or ``sha256:`` and the hash's first 12 hex digits)."""
        if key_hash in self._keys:
            return key_hash
        return key_id if key_id in self._keys else None

    def applies(self, app_id: str | None, key_id: str | None) -> bool:
        """Whether any limit may apply to this app or key (cheap: the step's first check)."""
        return app_id in self._apps or key_id in self._keys

    def plan(self, app_id: str | None, key_id: str | None, llm_id: str, model: str | None) -> Plan:
        """The counters a request of ``app_id`` with ``key_id`` to ``llm_id`` for ``model`` passes."""
        cache_key = (app_id, key_id, llm_id, model)
        found = self._plans.get(cache_key)
        if found is not None:
            return found
        scopes = []
        if app_id is not None:
            scopes += [f"app={app_id}", f"app={app_id},llm={llm_id}"]
            if model is not None:
                scopes.append(f"app={app_id},llm={llm_id},model={model}")
        if key_id is not None:
            scopes.append(f"key={key_id}")
        plan = tuple(c for scope in scopes for c in self._scopes.get(scope, ()))
        if len(self._plans) >= self._MAX_PLANS:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan


class CounterState(NamedTuple):
    """A counter as a request saw it: what is left after the request took its share, and when it is unused again.
    (A named tuple: one is made per counter and request, and a tuple is the cheapest record to make.)"""

    counter: Counter
    remaining: int
    reset_s: float


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` form: ``20ms``, ``1.5s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


_HEADER_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
                 for kind in ("requests", "tokens")}

Outcome = Literal["allowed", "limited", "redis_error_open", "redis_error_closed"]


@dataclass(slots=True)
class Decision:
    """What the limiter decided for one request.

    :param allowed: forward the request.
    :param outcome: the metric's result label.
    :param states: each counter of the plan as the request saw it (empty when Redis could not be asked).
    :param blocked: the counter that refused the request.
    :param retry_after_s: when ``blocked`` would let it pass.
    :param requested: what the request asked of ``blocked`` (1, its estimated tokens, or 1 in flight).
    :param admission: settle it when the request ends (None when refused or nothing was counted).
    """

    allowed: bool
    outcome: Outcome
    states: tuple[CounterState, ...] = ()
    blocked: Counter | None = None
    retry_after_s: float = 0.0
    requested: int = 0
    admission: Admission | None = None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``: of each kind, the counter with the
        least left relative to its limit."""
        tightest: dict[str, CounterState] = {}
        for state in self.states:  # one pass; "concurrent" has no OpenAI header
            kind = state.counter.kind
            if kind == "concurrent":
                continue
            best = tightest.get(kind)
            if best is None or state.remaining * best.counter.limit < best.remaining * state.counter.limit:
                tightest[kind] = state
        out: dict[str, str] = {}
        for name, state in tightest.items():
            remaining = state.remaining
            names = _HEADER_NAMES[name]
            out[names[0]] = str(state.counter.limit)
            out[names[1]] = str(remaining if remaining > 0 else 0)
            out[names[2]] = format_duration(state.reset_s)
        return out


class Admission(Protocol):
    """An admitted request's claim on its counters. :meth:`settle` exactly once when it ends (idempotent)."""

    def settle(self, actual_tokens: int | None) -> None:
        """Replace the token estimate by ``actual_tokens`` (None: nothing consumed, the estimate goes back) and
        end the concurrency claim."""


class RateLimiter(Protocol):
    """``local`` (:class:`LocalLimiter`) or ``shared`` (:class:`~gateway_tap.ratelimits.shared.SharedLimiter`)."""

    async def admit(self, plan: Plan, request_id: str, tokens: int) -> Decision:
        """Check every counter of ``plan`` and, when all pass, take the request's share of each."""
        ...

    async def close(self) -> None:
        """Finish pending settlements and release connections."""
        ...


class LocalAdmission:
    """An admission of :class:`LocalLimiter`."""

    __slots__ = ("_limiter", "done", "plan", "tokens")

    def __init__(self, limiter: LocalLimiter, plan: Plan, tokens: int) -> None:
        self._limiter = limiter
        self.plan = plan
        self.tokens = tokens
        self.done = False

    def settle(self, actual_tokens: int | None) -> None:
        if self.done:
            return
        self.done = True
        self._limiter._settle(self, actual_tokens)


class LocalLimiter:
    """Counters in this worker process: no I/O, exact for the worker, approximate across workers and taps (each
    worker admits up to the whole limit).

    :param clock: monotonic seconds (tests inject one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # name -> [used, updated at]
        self._inflight: dict[str, int] = {}

    def _used(self, counter: Counter, now: float) -> list[float]:
        bucket = self._buckets.get(counter.name)
        if bucket is None:
            bucket = self._buckets[counter.name] = [0.0, now]
        else:
            bucket[0] = max(0.0, bucket[0] - (now - bucket[1]) * counter.limit / 60.0)
            bucket[1] = now
        return bucket

    def check(self, plan: Plan, tokens: int) -> Decision:
        """The decision, taking the request's share when every counter passes (synchronous: one step)."""
        now = self._clock()
        buckets, inflight = self._buckets, self._inflight
        for counter in plan:  # on every request: plain comparisons, no helper calls
            limit = counter.limit
            if counter.kind == "concurrent":
                if inflight.get(counter.name, 0) >= limit:
                    return self._refused(plan, counter, 1.0, 1, now)
                continue
            bucket = buckets.get(counter.name)
            if bucket is None:
                bucket = buckets[counter.name] = [0.0, now]
            else:
                used = bucket[0] - (now - bucket[1]) * limit / 60.0
                bucket[0] = used if used > 0.0 else 0.0
                bucket[1] = now
            cost = 1 if counter.kind == "requests" else tokens
            need = cost if cost < limit else limit
            left = limit - bucket[0]
            if left < need:
                return self._refused(plan, counter, (need - left) * 60.0 / limit, cost, now)
        states = []
        for counter in plan:
            limit = counter.limit
            if counter.kind == "concurrent":
                used = self._inflight[counter.name] = self._inflight.get(counter.name, 0) + 1
                states.append(CounterState(counter, limit - used, 0.0))
                continue
            bucket = self._buckets[counter.name]
            used_now = bucket[0] = bucket[0] + (1 if counter.kind == "requests" else tokens)
            states.append(CounterState(counter, math.floor(limit - used_now), used_now * 60.0 / limit))
        return Decision(True, "allowed", tuple(states), admission=LocalAdmission(self, plan, tokens))

    @staticmethod
    def _state(counter: Counter, used: float) -> CounterState:
        return CounterState(counter, math.floor(counter.limit - used), used * 60.0 / counter.limit)

    def _refused(self, plan: Plan, blocked: Counter, retry_s: float, requested: int, now: float) -> Decision:
        states = []
        for counter in plan:
            if counter.kind == "concurrent":
                states.append(CounterState(counter, counter.limit - self._inflight.get(counter.name, 0), 0.0))
            else:
                states.append(self._state(counter, self._used(counter, now)[0]))
        return Decision(False, "limited", tuple(states), blocked, max(retry_s, 0.001), requested)

    async def admit(self, plan: Plan, request_id: str, tokens: int) -> Decision:
        return self.check(plan, tokens)

    def _settle(self, admission: LocalAdmission, actual_tokens: int | None) -> None:
        now = self._clock()
        for counter in admission.plan:
            if counter.kind == "concurrent":
                left = self._inflight.get(counter.name, 0) - 1
                if left > 0:
                    self._inflight[counter.name] = left
                else:
                    self._inflight.pop(counter.name, None)
            elif counter.kind == "tokens":
                delta = (actual_tokens or 0) - admission.tokens
                if delta:
                    bucket = self._used(counter, now)
                    bucket[0] = max(0.0, bucket[0] + delta)

    async def close(self) -> None:
        return None
