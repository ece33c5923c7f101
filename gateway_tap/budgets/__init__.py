"""Budgets: the budget store (SQLite / PostgreSQL) and the tap's enforcer.

Their settings are declared in :mod:`gateway_tap.settings.budgets`.

Usage flows tap -> Kafka (budget_usage) -> budget collector -> store -> enforcer
cache -> the tap's admission decision. Money is counted in integer micro-USD
everywhere (:func:`gateway_tap.budgets.periods.usd_to_micros` is the one rounding rule).
"""
