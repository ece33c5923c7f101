"""Budgets: configuration, the budget store (SQLite / PostgreSQL) and the tap's enforcer.

Usage flows tap -> Kafka (budget_usage) -> budget collector -> store -> enforcer
cache -> the tap's admission decision. Money is counted in integer micro-USD
everywhere (:func:`gateway_tap.budgets.periods.usd_to_micros` is the one rounding rule).
"""

from gateway_tap.budgets.settings import BudgetEnforcementSettings, BudgetSettings, BudgetStoreSettings

__all__ = ["BudgetEnforcementSettings", "BudgetSettings", "BudgetStoreSettings"]
