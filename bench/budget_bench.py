"""Budget store throughput: BudgetStore.record_batch vs a bare asyncpg bulk insert of the same rows.

Into the machine's PostgreSQL (a database created for the run and dropped after):

* ``record_batch``: the budget collector's path (one transaction per batch: ledger insert
  ON CONFLICT DO NOTHING RETURNING + totals upsert of the new rows only);
* the same rows redelivered (every event a duplicate: totals untouched);
* bare ``copy_records_to_table`` and bare ``executemany`` INSERT of the same rows into a
  ledger-shaped table (primary key on event id, no totals): the floor we compare against;
* SQLite ``record_batch`` for reference, and the tap's ``BudgetEnforcer.admit`` + settle per call.

    .venv/bin/python -m bench.budget_bench [--events 100000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
from prometheus_client import CollectorRegistry

from gateway_tap.budgets.enforcer import BudgetEnforcer
from gateway_tap.budgets.store import BudgetStore, UsageRecord, open_store
from gateway_tap.dev.servers import POSTGRES_DEFAULT_DSN, ensure_postgres
from gateway_tap.settings import BudgetEnforcementSettings, BudgetSettings, BudgetStoreSettings
from schemas import BudgetUsage, new_event_id

DAY = date(2026, 3, 15)


def rows(n: int) -> list[UsageRecord]:
    return [UsageRecord(new_event_id(), f"app-{i % 50}", f"llm-{i % 4}", DAY, 137 * (i % 11 + 1),
                        i % 500, i % 300, i % 800, 1) for i in range(n)]


def batches(records: list[UsageRecord], size: int) -> list[list[UsageRecord]]:
    return [records[i:i + size] for i in range(0, len(records), size)]


async def timed_store(store: BudgetStore, chunks: list[list[UsageRecord]]) -> float:
    t0 = time.perf_counter()
    for chunk in chunks:
        await store.record_batch(chunk)
    return time.perf_counter() - t0


async def bare(dsn: str, chunks: list[list[UsageRecord]], mode: str) -> float:
    conn = await asyncpg.connect(dsn)
    table = f"bare_{mode}"
    await conn.execute(f"CREATE TABLE {table} (event_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, llm_id TEXT NOT NULL,"
                       " day DATE NOT NULL, cost_micros BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL,"
                       " completion_tokens BIGINT NOT NULL, total_tokens BIGINT NOT NULL, requests INTEGER NOT NULL)")
    try:
        t0 = time.perf_counter()
        for chunk in chunks:
            tuples = [(u.event_id, u.app_id, u.llm_id, u.day, u.cost_micros, u.prompt_tokens, u.completion_tokens,
                       u.total_tokens, u.requests) for u in chunk]
            async with conn.transaction():
                if mode == "copy":
                    await conn.copy_records_to_table(table, records=tuples)
                else:
                    await conn.executemany(f"INSERT INTO {table} VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9) "
                                           "ON CONFLICT DO NOTHING", tuples)
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def enforcer_calls(store: BudgetStore, n: int) -> float:
    budgets = [BudgetSettings(app_id=f"app-{i}", limit_usd=1e9) for i in range(50)]
    enforcer = BudgetEnforcer(budgets, store, BudgetEnforcementSettings(staleness_s=3600),
                              registry=CollectorRegistry())
    await enforcer.start()
    now = datetime(2026, 3, 15, 12, tzinfo=UTC)
    usage = BudgetUsage(gateway_id="b", request_id="r", app_id="app-1", llm_id="llm-1", model="m", cost=0.001,
                        total_tokens=10, period_start=date(2026, 3, 1), emitted_at=now)
    usages = [usage.model_copy(update={"id": f"e{i}", "app_id": f"app-{i % 50}"}) for i in range(n)]
    apps = [f"app-{i % 50}" for i in range(n)]
    t0 = time.perf_counter()
    for i in range(n):
        d = enforcer.admit(apps[i], "llm-1", estimated_cost_usd=0.001, now=now)
        assert d.reservation is not None
        d.reservation.settle(usages[i])
    elapsed = time.perf_counter() - t0
    await enforcer.stop()
    return elapsed


async def main(n: int, size: int) -> None:
    admin_dsn = os.environ.get("GATEWAY_TAP_TEST_PG", POSTGRES_DEFAULT_DSN)
    if "GATEWAY_TAP_TEST_PG" not in os.environ:
        ensure_postgres()
    name = f"gateway_tap_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = f"{admin_dsn.rpartition('/')[0]}/{name}"
    out: dict[str, float] = {}
    try:
        records = rows(n)
        chunks = batches(records, size)
        pg = await open_store(BudgetStoreSettings(backend="postgres", postgres_dsn=dsn))
        out["postgres record_batch, new events/s"] = n / await timed_store(pg, chunks)
        out["postgres record_batch, redelivered (all duplicates) events/s"] = n / await timed_store(pg, chunks)
        out["bare asyncpg copy_records_to_table rows/s"] = n / await bare(dsn, chunks, "copy")
        out["bare asyncpg executemany INSERT rows/s"] = n / await bare(dsn, chunks, "executemany")
        calls = min(n, 50_000)
        out["enforcer admit()+settle() calls/s (postgres)"] = calls / await enforcer_calls(pg, calls)
        await pg.close()
        with tempfile.TemporaryDirectory() as tmp:
            lite = await open_store(BudgetStoreSettings(sqlite_path=str(Path(tmp) / "b.sqlite3")))
            out["sqlite record_batch, new events/s"] = n / await timed_store(lite, chunks)
            await lite.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{n} events in batches of {size}")
    for key, value in out.items():
        print(f"{key:<62} {value:>12,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.batch))
