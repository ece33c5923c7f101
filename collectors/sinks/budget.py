"""The built-in ``budget`` collector: budget_usage events -> the budget store.

One transaction per batch (:meth:`BudgetStore.record_batch`: bulk, idempotent by
event id); the runtime commits offsets only after the handler returned, i.e.
after the transaction committed. Then every budget touched by the batch is
checked against its alert thresholds; an alert is raised (warning log line and
``gateway_tap_budget_alerts_total``) only when :meth:`BudgetStore.claim_alert`
persists it for the first time, so each threshold alerts once per period even
across restarts and redeliveries.

```yaml
collectors:
  budget:
    group_instance_id: budget-1
    config:
      store: {backend: postgres, postgres_dsn_env: GATEWAY_TAP_BUDGET_PG_DSN}
      budgets: [{app_id: team-a, limit_usd: 100, period: monthly}]
```

``store`` and ``budgets`` default to the root config's ``budget_store`` and
``budgets`` sections (handed over as ``services.defaults``). The budgets set through the admin API
(apps' and keys', kept in the store's database) are checked too: their version is read with each
batch and they are read again when it moved. A key's budget counts the usage events that name
that key (``key_id``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import date
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import Field

from collectors.config import parse_collector_config
from collectors.metrics import DURATION_BUCKETS
from collectors.sdk import BadEvents, CollectorServices, DataCollector, RetryLater
from gateway_tap.admin.budget_rows import api_budgets
from gateway_tap.admin.db import Database
from gateway_tap.admin.db import connect as connect_admin_state
from gateway_tap.budgets.periods import period_start, usd_to_micros
from gateway_tap.budgets.store import BudgetStore, StoreUnavailable, UsageRecord, open_store
from gateway_tap.settings import BudgetSettings, BudgetStoreSettings, Section
from schemas import BudgetUsage


class BudgetCollectorConfig(Section):
    """The ``budget`` collector's own config."""

    store: BudgetStoreSettings | None = Field(default=None,
                                              description="Budget store (default: the root budget_store section).")
    budgets: list[BudgetSettings] | None = Field(
        default=None, description="Budgets whose alert thresholds are checked (default: the root budgets section).")


class BudgetCollector(DataCollector):
    """Records budget usage exactly once per event id and raises threshold alerts once per period."""

    event_types = ("budget_usage",)
    Config = BudgetCollectorConfig
    ordered_delivery = False  # exactly-once by event id: the order of batches does not matter

    store: BudgetStore | None = None

    @staticmethod
    def register_metrics(registry: CollectorRegistry) -> tuple[Counter, Counter, Histogram]:
        """The collector's own metrics (recorded, alerts, batch time) on ``registry``."""
        return (
            Counter("gateway_tap_budget_recorded_total", "Usage events recorded, by outcome.",
                    ["outcome"], registry=registry),
            Counter("gateway_tap_budget_alerts_total", "Budget threshold alerts raised (scope: app for an app's "
                    "budget, key for a key's own; the log line names the key).",
                    ["app", "llm", "period", "threshold", "scope"], registry=registry),
            Histogram("gateway_tap_budget_batch_seconds", "Budget store transaction time.",
                      buckets=DURATION_BUCKETS, registry=registry),
        )

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        parsed = parse_collector_config(services.name, BudgetCollectorConfig, config)
        store_settings = parsed.store or services.defaults.budget_store
        self.budgets: list[BudgetSettings] = list(
            parsed.budgets if parsed.budgets is not None else services.defaults.budgets)
        registry = services.metrics if isinstance(services.metrics, CollectorRegistry) else CollectorRegistry()
        self._recorded, self._alerts, self._batch_seconds = self.register_metrics(registry)
        # PostgreSQL connects lazily: a database that is still starting is a RetryLater on the first batch.
        self.store = await open_store(store_settings, migrate=False)
        self._store_settings = store_settings
        self._migrated = False
        self._admin: Database | None = None
        self._admin_version = -1
        self._api_budgets: list[BudgetSettings] = []

    async def handle_budget_usage_batch(self, events: Sequence[BudgetUsage]) -> None:
        assert self.store is not None
        rejected = {e.id: f"currency {e.currency!r} is not USD; the budget store counts USD only"
                    for e in events if e.currency.upper() != "USD"}
        records = [UsageRecord.from_event(e) for e in events if e.id not in rejected]
        started = time.perf_counter()
        try:
            if not self._migrated:
                await self.store.migrate()
                self._migrated = True
            result = await self.store.record_batch(records)
            await self._follow_api_budgets()
            # Alerts are checked for every record, duplicates included: a crash between the commit
            # and the alert leaves the threshold unclaimed, and the redelivered batch raises it.
            await self._check_alerts(records)
        except StoreUnavailable as exc:
            raise RetryLater(str(exc)) from exc
        self._batch_seconds.observe(time.perf_counter() - started)
        self._recorded.labels("inserted").inc(result.inserted)
        self._recorded.labels("duplicate").inc(result.duplicates)
        if rejected:
            raise BadEvents(rejected)

    async def _follow_api_budgets(self) -> None:
        """Read the admin API's budgets again when the admin state's version moved (one primary-key read)."""
        if self._admin is None:
            self._admin = await connect_admin_state(self._store_settings, migrate=False)
        version, budgets = await api_budgets(self._admin, self._admin_version)
        if budgets is not None:
            file_keys = {b.key for b in self.budgets}
            self._api_budgets = [b for b in budgets if b.key not in file_keys]
            self._admin_version = version

    async def _check_alerts(self, records: Sequence[UsageRecord]) -> None:
        assert self.store is not None
        touched: set[tuple[str, str, str, date]] = {(r.app_id, r.key_id, r.llm_id, r.day) for r in records}
        budgets = [*self.budgets, *self._api_budgets]
        due: set[tuple[int, date]] = set()
        for index, budget in enumerate(budgets):
            if not budget.alert_thresholds:
                continue
            for app_id, key_id, llm_id, day in touched:
                if (budget.app_id == app_id and budget.llm_id in (None, llm_id)
                        and budget.key_id in (None, key_id)):
                    due.add((index, period_start(budget.period, day)))
        for index, start in sorted(due):
            budget = budgets[index]
            spend = await self.store.spend(budget.app_id, budget.llm_id, budget.period, start, budget.key_id)
            for threshold in sorted(budget.alert_thresholds):
                if not _crossed(budget, spend.cost_micros, spend.total_tokens, threshold):
                    continue
                if await self.store.claim_alert(budget.key, start, threshold, spend):
                    self._alerts.labels(budget.app_id, budget.llm_id or "*", budget.period,
                                        f"{threshold:g}", "key" if budget.key_id else "app").inc()
                    self.services.logger.warning(
                        "budget alert: %s reached %g%% of its %s limit for the period starting %s "
                        "(spent $%.6f of %s, %d of %s tokens)", budget.key, threshold * 100, budget.mode,
                        start.isoformat(), spend.cost_micros / 1e6,
                        f"${budget.limit_usd:g}" if budget.limit_usd is not None else "-", spend.total_tokens,
                        budget.limit_tokens if budget.limit_tokens is not None else "-")

    async def close(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            await store.close()
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.close()


def _crossed(budget: BudgetSettings, cost_micros: int, tokens: int, threshold: float) -> bool:
    """True when spend reached ``threshold`` x limit (compared exactly, in integers and decimals)."""
    t = Decimal(repr(float(threshold)))
    if budget.limit_usd is not None and cost_micros >= t * usd_to_micros(budget.limit_usd):
        return True
    return budget.limit_tokens is not None and tokens >= t * budget.limit_tokens
