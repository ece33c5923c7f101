"""The budget store interface: an idempotent usage ledger plus daily totals.

Recording is keyed by event id: a ledger row per event (PRIMARY KEY), and per
``(app_id, llm_id, day)`` totals updated in the same transaction only for the
ledger rows that were newly inserted, so redelivering any batch changes nothing.
A usage that names the key it was made with (``key_id``) is also added to that key's
``(app_id, key_id, llm_id, day)`` totals, kept apart so that reading an app's totals never
reads a row per key. Days (UTC) are the storage unit; a daily or monthly period's spend is
the sum of its days. Money is integer micro-USD (exact sums).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from gateway_tap.budgets.periods import period_end, usage_day, usd_to_micros
from gateway_tap.settings import BudgetStoreSettings, Period
from schemas import BudgetUsage


class BudgetStoreError(Exception):
    """A store operation failed. ``retriable`` says whether trying again later can help."""

    retriable = False


class StoreUnavailable(BudgetStoreError):
    """The database cannot be reached or timed out; retry later."""

    retriable = True


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One ledger row: what one event consumed, on which UTC day."""

    event_id: str
    app_id: str
    llm_id: str
    day: date
    cost_micros: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    requests: int = 1
    key_id: str = ""
    """The key the call was made with (its id, as events name it); empty when unknown."""

    @classmethod
    def from_event(cls, event: BudgetUsage) -> UsageRecord:
        """The record for a budget_usage event: its ``cost_micros`` (since 1.2), else ``cost`` rounded by
        :func:`usd_to_micros`."""
        return cls(
            event_id=event.id,
            app_id=event.app_id,
            llm_id=event.llm_id,
            day=usage_day(event.period, event.period_start, event.emitted_at),
            cost_micros=event.cost_micros if event.cost_micros is not None else usd_to_micros(event.cost),
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            total_tokens=event.total_tokens or event.prompt_tokens + event.completion_tokens,
            requests=event.requests,
            key_id=event.key_id or "",
        )


@dataclass(frozen=True, slots=True)
class Spend:
    """Totals over some set of days."""

    cost_micros: int = 0
    total_tokens: int = 0
    requests: int = 0

    def __add__(self, other: Spend) -> Spend:
        return Spend(self.cost_micros + other.cost_micros, self.total_tokens + other.total_tokens,
                     self.requests + other.requests)


Scope = tuple[str, str]
"""Whose spend: ``(app_id, key_id)``, the key id empty for the whole app (every key's and keyless spend)."""


@dataclass(frozen=True, slots=True)
class DailyTotal:
    """One totals row: of the whole app when ``key_id`` is empty, else of that key of the app."""

    app_id: str
    llm_id: str
    day: date
    cost_micros: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int
    key_id: str = ""

    @property
    def scope(self) -> Scope:
        return self.app_id, self.key_id

    @property
    def spend(self) -> Spend:
        return Spend(self.cost_micros, self.total_tokens, self.requests)


@dataclass(frozen=True, slots=True)
class RecordResult:
    """Outcome of :meth:`BudgetStore.record_batch`."""

    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class SpendSnapshot:
    """A consistent read for the enforcer: daily totals and which of the asked event ids are recorded."""

    totals: list[DailyTotal]
    recorded_ids: set[str]


ClaimKey = tuple[str, str, str, date]
"""(app_id, key_id, llm_id, UTC day): what a claim is kept per (key id empty: a claim on the app's budgets)."""


@dataclass(frozen=True, slots=True)
class Claim:
    """One holder's claim on one app (or key of the app) x LLM x day: spend the ledger does not show yet (see
    :meth:`BudgetStore.claim`)."""

    holder: str
    app_id: str
    llm_id: str
    day: date
    cost_micros: int
    tokens: int
    key_id: str = ""

    @property
    def scope(self) -> Scope:
        return self.app_id, self.key_id


ClaimDecision = Callable[[list[DailyTotal], list[Claim]], Mapping[ClaimKey, tuple[int, int]]]
"""Given the app's totals and the other holders' live claims, this holder's new claims on the app."""


class BudgetStore(ABC):
    """One interface, two backends (:mod:`.sqlite`, :mod:`.postgres`).

    Methods raise :class:`StoreUnavailable` when the database cannot be reached
    and :class:`BudgetStoreError` for anything else.
    """

    @abstractmethod
    async def migrate(self) -> list[int]:
        """Apply the pending versioned migrations; returns the versions applied now."""

    @abstractmethod
    async def record_batch(self, usages: Sequence[UsageRecord]) -> RecordResult:
        """Record a batch in one transaction; events already recorded (or repeated) are ignored."""

    @abstractmethod
    async def daily_totals(self, since: date, until: date | None = None,
                           app_ids: Iterable[str] | None = None) -> list[DailyTotal]:
        """Apps' totals rows with ``since <= day < until`` (all apps when ``app_ids`` is None)."""

    @abstractmethod
    async def key_totals(self, since: date, until: date | None, scopes: Iterable[Scope]) -> list[DailyTotal]:
        """The totals rows of the keys ``scopes`` names (``(app_id, key_id)``) with ``since <= day < until``."""

    @abstractmethod
    async def snapshot(self, since: date, app_ids: Iterable[str], event_ids: Sequence[str],
                       key_scopes: Iterable[Scope] = ()) -> SpendSnapshot:
        """Daily totals since ``since`` for ``app_ids`` and the keys ``key_scopes`` names, plus which ``event_ids``
        are recorded, read atomically."""

    @abstractmethod
    async def claim(self, holder: str, app_id: str, since: date, decide: ClaimDecision, *, now_s: float,
                    expires_s: float, key_ids: Collection[str] = ()) -> Mapping[ClaimKey, tuple[int, int]]:
        """Replace ``holder``'s claims on ``app_id`` (and its keys) by what ``decide`` returns, in one transaction
        that no other :meth:`claim` of the same app interleaves with: ``decide`` gets the daily totals since
        ``since`` of the app and of its keys ``key_ids``, and the other holders' claims on the app and its keys
        since then that expire after ``now_s``. Rows of (0, 0) are not kept."""

    @abstractmethod
    async def put_claims(self, holder: str, claims: Mapping[ClaimKey, tuple[int, int]], *, now_s: float,
                         expires_s: float) -> None:
        """Replace every claim of ``holder`` by ``claims`` (renewed until ``expires_s``); also drops claims of any
        holder that expired more than an hour before ``now_s``."""

    @abstractmethod
    async def claim_alert(self, budget_key: str, period_start: date, threshold: float, spend: Spend) -> bool:
        """Persist that an alert fired; True only the first time for (budget, period, threshold)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; safe to call twice."""

    async def spend(self, app_id: str, llm_id: str | None, period: Period, start: date,
                    key_id: str | None = None) -> Spend:
        """Spend of an app, or of one of its keys (one LLM, or all when ``llm_id`` is None) in the period starting at
        ``start``."""
        total = Spend()
        end = period_end(period, start)
        rows = (await self.key_totals(start, end, [(app_id, key_id)]) if key_id
                else await self.daily_totals(start, end, [app_id]))
        for row in rows:
            if llm_id is None or row.llm_id == llm_id:
                total += row.spend
        return total

    async def summary(self, period: Period, start: date) -> dict[tuple[str, str], Spend]:
        """Spend per (app, LLM) in one period: what dashboards and ``GET /budget`` summarise."""
        out: dict[tuple[str, str], Spend] = {}
        for row in await self.daily_totals(start, period_end(period, start)):
            key = (row.app_id, row.llm_id)
            out[key] = out.get(key, Spend()) + row.spend
        return out

    async def __aenter__(self) -> BudgetStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def open_store(settings: BudgetStoreSettings, *, migrate: bool = True) -> BudgetStore:
    """Connect to the configured backend (and apply migrations unless ``migrate=False``).

    :raises StoreUnavailable: the database cannot be reached.
    """
    store: BudgetStore
    if settings.backend == "postgres":
        from gateway_tap.budgets.postgres import PostgresBudgetStore

        store = await PostgresBudgetStore.connect(settings)
    else:
        from gateway_tap.budgets.sqlite import SqliteBudgetStore

        store = await SqliteBudgetStore.connect(settings)
    if migrate:
        try:
            await store.migrate()
        except BaseException:
            await store.close()
            raise
    return store
