"""The admin API's budgets as stored (an app's, a key's), read by the admin state and by the ``budget`` collector.

The collector raises the alerts of every budget, the API's too, but must not import the tap's plugin machinery that
the rest of the admin state needs: this module reads the two budget tables and the state's version with nothing
but the database.
"""

from __future__ import annotations

from gateway_tap.admin.db import Database, Row
from gateway_tap.settings import BudgetSettings

APP_BUDGETS = "SELECT settings, app_id, llm_id, period FROM admin_budgets ORDER BY app_id, llm_id, period"
KEY_BUDGETS = ("SELECT settings, app_id, key_id, llm_id, period FROM admin_key_budgets "
               "ORDER BY app_id, key_id, llm_id, period")
VERSION = "SELECT version FROM admin_state WHERE id = 1"


def app_budget(row: Row) -> BudgetSettings:
    return BudgetSettings.model_validate_json(row[0])


def app_budget_entry(row: Row) -> str:
    return f"apps/{row[1]}/budgets/{row[1]}{'/' + row[2] if row[2] else ''}:{row[3]}"


def key_budget(row: Row) -> BudgetSettings:
    """A key budget's row: its JSON must name the app and key of its row (a row written by hand may not)."""
    budget = BudgetSettings.model_validate_json(row[0])
    if (budget.app_id, budget.key_id) != (row[1], row[2]):
        raise ValueError(f"its settings name app {budget.app_id!r} key {budget.key_id!r}")
    return budget


def key_budget_entry(row: Row) -> str:
    return f"apps/{row[1]}/keys/{row[2]}/budgets/{row[1]}@{row[2]}{'/' + row[3] if row[3] else ''}:{row[4]}"


async def api_budgets(db: Database, known_version: int) -> tuple[int, list[BudgetSettings] | None]:
    """The state's version and, when it is not ``known_version``, the API's budgets (apps' then keys'), read in one
    transaction; rows that do not parse are left out (the admin state reports them).

    :raises gateway_tap.budgets.store.StoreUnavailable: the database cannot be reached.
    """
    out: list[BudgetSettings] = []
    async with db.transaction(write=False) as tx:
        row = await tx.fetchone(VERSION)
        version = int(row[0]) if row else 0
        if version == known_version:
            return version, None
        for sql, parse in ((APP_BUDGETS, app_budget), (KEY_BUDGETS, key_budget)):
            for r in await tx.fetch(sql):
                try:
                    out.append(parse(r))
                except (ValueError, TypeError):  # pydantic's and orjson's errors are ValueErrors
                    continue
    return version, out
