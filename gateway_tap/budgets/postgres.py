"""PostgreSQL budget store (asyncpg pool): the production backend.

A batch is one statement and one round trip: the rows travel as arrays,
``unnest`` turns them into a relation, the ledger insert skips known event ids
(``ON CONFLICT DO NOTHING RETURNING``) and the totals upsert sums only what that
insert returned, all inside one transaction. Rows are inserted in key order so
concurrent batches lock in the same order; a deadlock or serialization failure is
retried.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date
from typing import Any

import asyncpg

from gateway_tap.budgets import migrations
from gateway_tap.budgets.store import (
    BudgetStore,
    BudgetStoreError,
    Claim,
    ClaimDecision,
    ClaimKey,
    DailyTotal,
    RecordResult,
    Scope,
    Spend,
    SpendSnapshot,
    StoreUnavailable,
    UsageRecord,
)
from gateway_tap.settings import BudgetStoreSettings

_ADD = ("cost_micros = t.cost_micros + EXCLUDED.cost_micros, prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens, "
        "completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens, "
        "total_tokens = t.total_tokens + EXCLUDED.total_tokens, requests = t.requests + EXCLUDED.requests")
"""Adds a new totals row (``EXCLUDED``) to the stored one (``t``)."""
_RECORD = f"""
WITH stage AS (
    SELECT DISTINCT ON (event_id) *
    FROM unnest($1::text[], $2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[], $7::bigint[],
                $8::bigint[], $9::int[], $10::text[])
         AS s(event_id, app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests,
              key_id)
    ORDER BY event_id
), ins AS (
    INSERT INTO budget_ledger (event_id, app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens,
                               total_tokens, requests, key_id)
    SELECT * FROM stage ORDER BY event_id
    ON CONFLICT (event_id) DO NOTHING
    RETURNING app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests, key_id
), key_totals AS (
    INSERT INTO budget_key_totals AS t (app_id, key_id, day, llm_id, cost_micros, prompt_tokens, completion_tokens,
                                        total_tokens, requests)
    SELECT app_id, key_id, day, llm_id, sum(cost_micros)::bigint, sum(prompt_tokens)::bigint,
           sum(completion_tokens)::bigint, sum(total_tokens)::bigint, sum(requests)::bigint
    FROM ins WHERE key_id <> '' GROUP BY app_id, key_id, day, llm_id ORDER BY app_id, key_id, day, llm_id
    ON CONFLICT (app_id, key_id, day, llm_id) DO UPDATE SET {_ADD}
    RETURNING 1
), totals AS (
    INSERT INTO budget_totals AS t (app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens,
                                    total_tokens, requests)
    SELECT app_id, llm_id, day, sum(cost_micros)::bigint, sum(prompt_tokens)::bigint,
           sum(completion_tokens)::bigint, sum(total_tokens)::bigint, sum(requests)::bigint
    FROM ins GROUP BY app_id, day, llm_id ORDER BY app_id, day, llm_id
    ON CONFLICT (app_id, day, llm_id) DO UPDATE SET {_ADD}
    RETURNING 1
)
SELECT count(*) FROM ins
"""
_TOTALS = ("SELECT app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests "
           "FROM budget_totals WHERE day >= $1 AND ($2::date IS NULL OR day < $2) "
           "AND ($3::text[] IS NULL OR app_id = ANY($3))")
_KEY_TOTALS = ("SELECT app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests, "
               "key_id FROM budget_key_totals WHERE day >= $1 AND ($2::date IS NULL OR day < $2) "
               "AND (app_id, key_id) IN (SELECT * FROM unnest($3::text[], $4::text[]))")
_MIGRATION_LOCK = 0x6761746577  # advisory lock id: one migrator at a time
_CLAIM_LOCK = 0x676174  # advisory lock class of the claims: (class, hashtext(app_id)), one claimer per app
_OTHER_CLAIMS = ("SELECT holder, app_id, llm_id, day, cost_micros, tokens, key_id FROM budget_claims "
                 "WHERE app_id = $1 AND day >= $2 AND holder <> $3 AND expires_s > $4")
_INSERT_CLAIMS = ("INSERT INTO budget_claims (holder, app_id, llm_id, day, cost_micros, tokens, key_id, expires_s) "
                  "SELECT $1::text, * FROM unnest($2::text[], $3::text[], $4::date[], $5::bigint[], $6::bigint[], "
                  "$7::text[]) AS c(app_id, llm_id, day, cost_micros, tokens, key_id), "
                  "(SELECT $8::double precision) AS e(expires_s)")
_RETRIES = 5


def _translate(exc: BaseException) -> BudgetStoreError:
    unavailable = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                   asyncpg.exceptions.TooManyConnectionsError, asyncpg.exceptions.CannotConnectNowError,
                   asyncpg.exceptions.AdminShutdownError)
    if isinstance(exc, unavailable):
        return StoreUnavailable(f"postgres budget store unavailable: {type(exc).__name__}: {exc}")
    return BudgetStoreError(f"postgres budget store error: {type(exc).__name__}: {exc}")


class PostgresBudgetStore(BudgetStore):
    """:class:`BudgetStore` on PostgreSQL. Create with :meth:`connect`."""

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool: asyncpg.Pool | None = pool
        self.schema = schema

    @classmethod
    async def connect(cls, settings: BudgetStoreSettings) -> PostgresBudgetStore:
        """Create the pool. Connections open lazily, so a database that is down now is not an error yet."""
        try:
            pool = await asyncpg.create_pool(
                settings.dsn(), min_size=0, max_size=settings.pool_max_size, timeout=settings.timeout_s,
                command_timeout=settings.timeout_s,
                server_settings={"search_path": settings.postgres_schema, "application_name": "gateway-tap"})
        except Exception as exc:
            raise _translate(exc) from exc
        return cls(pool, settings.postgres_schema)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise BudgetStoreError("budget store is closed")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except BudgetStoreError:
            raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise _translate(exc) from exc

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                               "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for migration in migrations.load("postgres"):
                if migration.version in done:
                    continue
                for statement in migration.statements():
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                   migration.version, migration.name)
                applied.append(migration.version)
        return applied

    async def record_batch(self, usages: Sequence[UsageRecord]) -> RecordResult:
        if not usages:
            return RecordResult(0, 0)
        columns: list[list[Any]] = [[] for _ in range(10)]
        for u in usages:
            for i, value in enumerate((u.event_id, u.app_id, u.llm_id, u.day, u.cost_micros, u.prompt_tokens,
                                       u.completion_tokens, u.total_tokens, u.requests, u.key_id)):
                columns[i].append(value)
        for attempt in range(_RETRIES):
            try:
                async with self._connection() as conn, conn.transaction():
                    inserted: int = await conn.fetchval(_RECORD, *columns)
                return RecordResult(inserted, len(usages) - inserted)
            except BudgetStoreError as exc:
                cause = exc.__cause__
                retry = isinstance(cause, asyncpg.exceptions.DeadlockDetectedError
                                   | asyncpg.exceptions.SerializationError)
                if not retry or attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    @staticmethod
    async def _totals(conn: asyncpg.Connection, since: date, until: date | None,
                      app_ids: Iterable[str] | None) -> list[DailyTotal]:
        rows = await conn.fetch(_TOTALS, since, until, list(app_ids) if app_ids is not None else None)
        return [DailyTotal(*r) for r in rows]

    @staticmethod
    async def _key_totals(conn: asyncpg.Connection, since: date, until: date | None,
                          scopes: Iterable[Scope]) -> list[DailyTotal]:
        wanted = list(scopes)
        if not wanted:
            return []
        rows = await conn.fetch(_KEY_TOTALS, since, until, [s[0] for s in wanted], [s[1] for s in wanted])
        return [DailyTotal(*r) for r in rows]

    async def daily_totals(self, since: date, until: date | None = None,
                           app_ids: Iterable[str] | None = None) -> list[DailyTotal]:
        async with self._connection() as conn:
            return await self._totals(conn, since, until, app_ids)

    async def key_totals(self, since: date, until: date | None, scopes: Iterable[Scope]) -> list[DailyTotal]:
        async with self._connection() as conn:
            return await self._key_totals(conn, since, until, scopes)

    async def snapshot(self, since: date, app_ids: Iterable[str], event_ids: Sequence[str],
                       key_scopes: Iterable[Scope] = ()) -> SpendSnapshot:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            totals = await self._totals(conn, since, None, app_ids)
            totals += await self._key_totals(conn, since, None, key_scopes)
            recorded: set[str] = set()
            if event_ids:
                rows = await conn.fetch("SELECT event_id FROM budget_ledger WHERE event_id = ANY($1::text[])",
                                        list(event_ids))
                recorded = {r[0] for r in rows}
        return SpendSnapshot(totals, recorded)

    @staticmethod
    async def _write_claims(conn: asyncpg.Connection, holder: str, claims: Mapping[ClaimKey, tuple[int, int]],
                            expires_s: float) -> None:
        rows = sorted((k, v) for k, v in claims.items() if v != (0, 0))
        if rows:
            await conn.execute(_INSERT_CLAIMS, holder, [k[0] for k, _ in rows], [k[2] for k, _ in rows],
                               [k[3] for k, _ in rows], [v[0] for _, v in rows], [v[1] for _, v in rows],
                               [k[1] for k, _ in rows], expires_s)

    async def claim(self, holder: str, app_id: str, since: date, decide: ClaimDecision, *, now_s: float,
                    expires_s: float, key_ids: Collection[str] = ()) -> Mapping[ClaimKey, tuple[int, int]]:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _CLAIM_LOCK, app_id)
            totals = await self._totals(conn, since, None, [app_id])
            totals += await self._key_totals(conn, since, None, [(app_id, k) for k in key_ids])
            others = [Claim(*r) for r in await conn.fetch(_OTHER_CLAIMS, app_id, since, holder, now_s)]
            mine = decide(totals, others)
            await conn.execute("DELETE FROM budget_claims WHERE app_id = $1 AND holder = $2", app_id, holder)
            await self._write_claims(conn, holder, {k: v for k, v in mine.items() if k[0] == app_id}, expires_s)
        return mine

    async def put_claims(self, holder: str, claims: Mapping[ClaimKey, tuple[int, int]], *, now_s: float,
                         expires_s: float) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM budget_claims WHERE holder = $1 OR expires_s < $2", holder,
                               now_s - 3600.0)
            await self._write_claims(conn, holder, claims, expires_s)

    async def claim_alert(self, budget_key: str, period_start: date, threshold: float, spend: Spend) -> bool:
        async with self._connection() as conn:
            status: str = await conn.execute(
                "INSERT INTO budget_alerts (budget_key, period_start, threshold, cost_micros, total_tokens) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                budget_key, period_start, repr(float(threshold)), spend.cost_micros, spend.total_tokens)
        return status.endswith(" 1")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
