"""The ``budgets``, ``budget_store`` and ``budget_enforcement`` config sections."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, model_validator

from gateway_tap.settings.apps import KeyId
from gateway_tap.settings.base import Id, Section

Period = Literal["monthly", "daily"]


class BudgetSettings(Section):
    """One budget: per app, or per app x LLM when ``llm_id`` is set; one key's own when ``key_id`` is set."""

    app_id: Id = Field(description="The app this budget applies to.")
    llm_id: Id | None = Field(default=None, description="Limit only this LLM of the app (default: all its LLMs).")
    key_id: KeyId | None = Field(
        default=None,
        description="Limit only the requests made with this key of the app: its id as events name it (an issued "
                    "key's id, apps[].key_ids, or 'sha256:' and the first 12 hex digits of its hash). The app's "
                    "own budgets apply to those requests too.")
    limit_usd: float | None = Field(default=None, ge=0, description="Spend limit per period in USD.")
    limit_tokens: int | None = Field(default=None, ge=0, description="Total-token limit per period.")
    period: Period = Field(default="monthly", description="monthly (calendar month, UTC) or daily (UTC day).")
    mode: Literal["hard", "soft"] = Field(default="hard",
                                          description="hard: block with 429 when reached; soft: alert only.")
    alert_thresholds: tuple[float, ...] = Field(
        default=(0.8, 1.0), description="Fractions of the limit that raise an alert, once each per period.")

    @model_validator(mode="after")
    def _check(self) -> BudgetSettings:
        if self.limit_usd is None and self.limit_tokens is None:
            raise ValueError("set limit_usd and/or limit_tokens")
        if any(t <= 0 for t in self.alert_thresholds):
            raise ValueError("alert_thresholds must be positive fractions of the limit (e.g. 0.8)")
        return self

    @property
    def key(self) -> str:
        """Stable identity of this budget (used to persist alert state): ``app[@key][/llm]:period``."""
        return f"{self.app_id}{'@' + self.key_id if self.key_id else ''}{'/' + self.llm_id if self.llm_id else ''}" \
               f":{self.period}"

    @property
    def scope(self) -> tuple[str, str]:
        """Whose spend it limits: ``(app_id, key_id)``, the key id empty for the whole app."""
        return self.app_id, self.key_id or ""


class BudgetStoreSettings(Section):
    """Where spend is recorded (budget collector) and read back (tap)."""

    backend: Literal["sqlite", "postgres"] = Field(default="sqlite", description="sqlite (embedded) or postgres.")
    sqlite_path: str = Field(default=".gateway-tap/budgets.sqlite3", description="SQLite database file (WAL mode).")
    postgres_dsn: str | None = Field(default=None, description="PostgreSQL DSN; prefer postgres_dsn_env for secrets.")
    postgres_dsn_env: str = Field(default="GATEWAY_TAP_BUDGET_PG_DSN",
                                  description="Environment variable holding the DSN when postgres_dsn is unset.")
    postgres_schema: str = Field(default="public", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                 description="Schema holding the budget tables (created if missing).")
    pool_max_size: int = Field(default=4, ge=1, description="PostgreSQL connection pool size.")
    timeout_s: float = Field(default=5.0, gt=0, description="Connect and statement timeout.")

    def dsn(self) -> str:
        """The PostgreSQL DSN (from the setting or the environment)."""
        dsn = self.postgres_dsn or os.environ.get(self.postgres_dsn_env)
        if not dsn:
            raise ValueError(f"budget_store.postgres_dsn is unset and ${self.postgres_dsn_env} is empty")
        return dsn


class BudgetEnforcementSettings(Section):
    """How the tap enforces budgets (the built-in post-auth step)."""

    enabled: bool = Field(default=True, description="Check budgets before forwarding requests.")
    position: Literal["before_plugins", "after_plugins"] = Field(
        default="before_plugins", description="Where the budget step runs relative to plugins' post-auth hooks.")
    staleness_s: float = Field(default=1.0, gt=0, description="Spend cache refresh interval (seconds).")
    on_store_error: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="When the store has been unreachable for store_error_grace_s: fail_open admits requests "
                    "(still blocking on the last known spend plus this tap's own admitted spend), "
                    "fail_closed rejects requests of apps with hard budgets.")
    store_error_grace_s: float = Field(default=5.0, ge=0, description="Failed refreshes tolerated for this long.")
    pending_ttl_s: float = Field(default=3600.0, gt=0,
                                 description="Forget this tap's settled spend not seen in the store after this long.")
    leases: bool = Field(
        default=True,
        description="Hard budgets hold across taps and workers: each worker admits against a lease granted by the "
                    "store's database, where every worker's claims (unused lease, requests in flight, spend not yet "
                    "recorded) are kept, so the overspend does not grow with the pipeline's lag or the number of "
                    "taps (docs/budgets.md). false: each worker counts only its own spend until the store has it.")
    lease_fraction: float = Field(default=0.1, gt=0, le=1,
                                  description="A lease takes this fraction of the budget's room left (at least what "
                                              "the request needs); what a worker does not use is returned at its next "
                                              "refresh.")
    claim_ttl_s: float = Field(default=300.0, gt=0,
                               description="A worker's claims expire when it stops renewing them (every staleness_s) "
                                           "for this long: what a dead worker held is freed.")


def check_budget_references(budgets: list[BudgetSettings], app_ids: set[str], llm_ids: set[str],
                            key_ids: Mapping[str, set[str]] | None = None) -> list[str]:
    """Cross-section problems of the ``budgets`` list, one ``key.path: message`` line each.

    Duplicates of (app, key, LLM, period) are errors (their alerts would share one state);
    unknown apps and LLMs are errors when the file declares ``apps`` / ``llms`` at all, and a key budget's key must
    be one of its app's (``key_ids``: the ids of each app's keys, :meth:`AppConfig.all_key_ids`) when given.
    """
    problems: list[str] = []
    seen: set[str] = set()
    for i, budget in enumerate(budgets):
        if budget.key in seen:
            problems.append(f"budgets[{i}]: duplicate budget for app {budget.app_id!r}"
                            f"{f' key {budget.key_id!r}' if budget.key_id else ''}"
                            f"{f' x LLM {budget.llm_id!r}' if budget.llm_id else ''} ({budget.period})")
        seen.add(budget.key)
        if app_ids and budget.app_id not in app_ids:
            problems.append(f"budgets[{i}].app_id: unknown app {budget.app_id!r}")
        if llm_ids and budget.llm_id is not None and budget.llm_id not in llm_ids:
            problems.append(f"budgets[{i}].llm_id: unknown LLM {budget.llm_id!r}")
        if (budget.key_id is not None and key_ids is not None and budget.app_id in key_ids
                and budget.key_id not in key_ids[budget.app_id]):
            problems.append(f"budgets[{i}].key_id: app {budget.app_id!r} has no key {budget.key_id!r}")
    return problems
