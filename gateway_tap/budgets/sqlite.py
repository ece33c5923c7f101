"""SQLite budget store (aiosqlite, WAL): the embedded default.

One connection per store object, transactions serialised by a lock; other
processes (the tap reading, the collector writing) share the file through WAL
and ``busy_timeout``. Writes take the lock up front (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import date
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

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

_STAGE = """CREATE TEMP TABLE IF NOT EXISTS budget_stage_v6 (
    event_id TEXT PRIMARY KEY, app_id TEXT, llm_id TEXT, day TEXT, cost_micros INTEGER,
    prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, requests INTEGER, key_id TEXT)"""
_COLUMNS = ("event_id, app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests, "
            "key_id")
_TOTALS_COLUMNS = "app_id, llm_id, day, cost_micros, prompt_tokens, completion_tokens, total_tokens, requests"
_SUMS = ("SUM(cost_micros), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens), SUM(requests) "
         "FROM budget_stage_v6")
_ADD = ("cost_micros = cost_micros + excluded.cost_micros, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "completion_tokens = completion_tokens + excluded.completion_tokens, "
        "total_tokens = total_tokens + excluded.total_tokens, requests = requests + excluded.requests")
_CLAIM_COLUMNS = "holder, app_id, llm_id, day, cost_micros, tokens, key_id"


def _translate(exc: Exception, what: str = "budget store") -> BudgetStoreError:
    if isinstance(exc, sqlite3.OperationalError | OSError):
        return StoreUnavailable(f"sqlite {what} unavailable: {exc}")
    return BudgetStoreError(f"sqlite {what} error: {exc}")


@asynccontextmanager
async def sqlite_transaction(conn: aiosqlite.Connection, mode: str,
                             what: str = "budget store") -> AsyncIterator[aiosqlite.Connection]:
    """``BEGIN <mode>`` ... ``COMMIT`` on ``conn`` (opened with ``isolation_level=None``), rolled back on any
    error; SQLite errors become :class:`StoreUnavailable` / :class:`BudgetStoreError` naming ``what``.
    The caller serialises transactions on one connection."""
    try:
        await conn.execute(f"BEGIN {mode}")
    except sqlite3.Error as exc:
        raise _translate(exc, what) from exc
    try:
        yield conn
        await conn.execute("COMMIT")
    except BaseException as exc:
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise _translate(exc, what) from exc
        raise


async def _enable_wal(conn: aiosqlite.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode, waiting up to ``timeout_s`` for other processes (tap workers and the budget
    collector open the same file). Changing the mode needs an exclusive lock for which SQLite does not call
    the busy handler, so two openers of a new file could get "database is locked" at once: read the mode
    first (it is stored in the file, only the first opener changes it) and retry with a short backoff."""
    deadline = time.monotonic() + timeout_s
    delay_s = 0.005
    while True:
        try:
            async with conn.execute("PRAGMA journal_mode") as cursor:
                row = await cursor.fetchone()
            if row is None or row[0] != "wal":
                await conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.1)


class SqliteBudgetStore(BudgetStore):
    """:class:`BudgetStore` on one SQLite file. Create with :meth:`connect`."""

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, settings: BudgetStoreSettings) -> SqliteBudgetStore:
        """Open (creating if needed) ``settings.sqlite_path`` in WAL mode.

        :raises StoreUnavailable: the file cannot be opened.
        """
        path = Path(settings.sqlite_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, isolation_level=None, timeout=settings.timeout_s)
        except (OSError, sqlite3.Error) as exc:
            raise _translate(exc) from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(settings.timeout_s * 1000)}")
            await _enable_wal(conn, settings.timeout_s)
            # FULL: a committed batch survives power loss, since offsets are committed right after.
            await conn.execute("PRAGMA synchronous = FULL")
            await conn.execute(_STAGE)
        except sqlite3.Error as exc:
            await conn.close()
            raise _translate(exc) from exc
        return cls(conn, path)

    @asynccontextmanager
    async def _transaction(self, mode: str = "DEFERRED") -> AsyncIterator[aiosqlite.Connection]:
        if self._conn is None:
            raise BudgetStoreError("budget store is closed")
        async with self._lock, sqlite_transaction(self._conn, mode) as conn:
            yield conn

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._transaction("IMMEDIATE") as conn:
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                               "name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
            async with conn.execute("SELECT version FROM schema_migrations") as cur:
                done = {row[0] for row in await cur.fetchall()}
            for migration in migrations.load("sqlite"):
                if migration.version in done:
                    continue
                for statement in migration.statements():
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                                   (migration.version, migration.name))
                applied.append(migration.version)
        return applied

    async def record_batch(self, usages: Sequence[UsageRecord]) -> RecordResult:
        if not usages:
            return RecordResult(0, 0)
        rows = [(u.event_id, u.app_id, u.llm_id, u.day.isoformat(), u.cost_micros, u.prompt_tokens,
                 u.completion_tokens, u.total_tokens, u.requests, u.key_id) for u in usages]
        async with self._transaction("IMMEDIATE") as conn:
            await conn.execute("DELETE FROM budget_stage_v6")
            # OR IGNORE drops repeats inside the batch; the DELETE drops events recorded earlier.
            await conn.executemany(
                f"INSERT OR IGNORE INTO budget_stage_v6 ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            await conn.execute("DELETE FROM budget_stage_v6 WHERE event_id IN (SELECT event_id FROM budget_ledger)")
            cur = await conn.execute(
                f"INSERT INTO budget_ledger ({_COLUMNS}) SELECT {_COLUMNS} FROM budget_stage_v6")
            inserted = cur.rowcount
            await conn.execute(
                f"INSERT INTO budget_totals ({_TOTALS_COLUMNS}) SELECT app_id, llm_id, day, {_SUMS} "
                f"WHERE true GROUP BY app_id, day, llm_id ON CONFLICT (app_id, day, llm_id) DO UPDATE SET {_ADD}")
            await conn.execute(
                f"INSERT INTO budget_key_totals (key_id, {_TOTALS_COLUMNS}) SELECT key_id, app_id, llm_id, day, "
                f"{_SUMS} WHERE key_id <> '' GROUP BY app_id, key_id, day, llm_id "
                f"ON CONFLICT (app_id, key_id, day, llm_id) DO UPDATE SET {_ADD}")
            await conn.execute("DELETE FROM budget_stage_v6")
        return RecordResult(inserted, len(usages) - inserted)

    async def _totals(self, conn: aiosqlite.Connection, since: date, until: date | None,
                      app_ids: Iterable[str] | None) -> list[DailyTotal]:
        sql = f"SELECT {_TOTALS_COLUMNS} FROM budget_totals WHERE day >= ?"
        params: list[Any] = [since.isoformat()]
        if until is not None:
            sql += " AND day < ?"
            params.append(until.isoformat())
        if app_ids is not None:
            sql += " AND app_id IN (SELECT value FROM json_each(?))"
            params.append(orjson.dumps(list(app_ids)).decode())
        async with conn.execute(sql, params) as cur:
            return [DailyTotal(r[0], r[1], date.fromisoformat(r[2]), *r[3:]) for r in await cur.fetchall()]

    @staticmethod
    async def _key_totals(conn: aiosqlite.Connection, since: date, until: date | None,
                          scopes: Iterable[Scope]) -> list[DailyTotal]:
        wanted = [list(s) for s in scopes]
        if not wanted:
            return []
        sql = (f"SELECT {_TOTALS_COLUMNS}, key_id FROM budget_key_totals WHERE day >= ? AND day < ? "
               "AND (app_id, key_id) IN (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') "
               "FROM json_each(?))")
        params = (since.isoformat(), until.isoformat() if until is not None else "9999-12-31",
                  orjson.dumps(wanted).decode())
        async with conn.execute(sql, params) as cur:
            return [DailyTotal(r[0], r[1], date.fromisoformat(r[2]), *r[3:]) for r in await cur.fetchall()]

    async def daily_totals(self, since: date, until: date | None = None,
                           app_ids: Iterable[str] | None = None) -> list[DailyTotal]:
        async with self._transaction() as conn:
            return await self._totals(conn, since, until, app_ids)

    async def key_totals(self, since: date, until: date | None, scopes: Iterable[Scope]) -> list[DailyTotal]:
        async with self._transaction() as conn:
            return await self._key_totals(conn, since, until, scopes)

    async def snapshot(self, since: date, app_ids: Iterable[str], event_ids: Sequence[str],
                       key_scopes: Iterable[Scope] = ()) -> SpendSnapshot:
        async with self._transaction() as conn:
            totals = await self._totals(conn, since, None, app_ids)
            totals += await self._key_totals(conn, since, None, key_scopes)
            recorded: set[str] = set()
            if event_ids:
                async with conn.execute(
                        "SELECT event_id FROM budget_ledger WHERE event_id IN (SELECT value FROM json_each(?))",
                        (orjson.dumps(list(event_ids)).decode(),)) as cur:
                    recorded = {r[0] for r in await cur.fetchall()}
        return SpendSnapshot(totals, recorded)

    @staticmethod
    async def _write_claims(conn: aiosqlite.Connection, holder: str, claims: Mapping[ClaimKey, tuple[int, int]],
                            expires_s: float) -> None:
        await conn.executemany(
            f"INSERT INTO budget_claims ({_CLAIM_COLUMNS}, expires_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(holder, k[0], k[2], k[3].isoformat(), v[0], v[1], k[1], expires_s) for k, v in sorted(claims.items())
             if v != (0, 0)])

    async def claim(self, holder: str, app_id: str, since: date, decide: ClaimDecision, *, now_s: float,
                    expires_s: float, key_ids: Collection[str] = ()) -> Mapping[ClaimKey, tuple[int, int]]:
        # BEGIN IMMEDIATE takes the file's write lock first: every claimer, of any process, runs alone.
        async with self._transaction("IMMEDIATE") as conn:
            totals = await self._totals(conn, since, None, [app_id])
            totals += await self._key_totals(conn, since, None, [(app_id, k) for k in key_ids])
            async with conn.execute(
                    f"SELECT {_CLAIM_COLUMNS} FROM budget_claims "
                    "WHERE app_id = ? AND day >= ? AND holder <> ? AND expires_s > ?",
                    (app_id, since.isoformat(), holder, now_s)) as cur:
                others = [Claim(r[0], r[1], r[2], date.fromisoformat(r[3]), r[4], r[5], r[6])
                          for r in await cur.fetchall()]
            mine = decide(totals, others)
            await conn.execute("DELETE FROM budget_claims WHERE app_id = ? AND holder = ?", (app_id, holder))
            await self._write_claims(conn, holder, {k: v for k, v in mine.items() if k[0] == app_id}, expires_s)
        return mine

    async def put_claims(self, holder: str, claims: Mapping[ClaimKey, tuple[int, int]], *, now_s: float,
                         expires_s: float) -> None:
        async with self._transaction("IMMEDIATE") as conn:
            await conn.execute("DELETE FROM budget_claims WHERE holder = ? OR expires_s < ?", (holder, now_s - 3600.0))
            await self._write_claims(conn, holder, claims, expires_s)

    async def claim_alert(self, budget_key: str, period_start: date, threshold: float, spend: Spend) -> bool:
        async with self._transaction("IMMEDIATE") as conn:
            cur = await conn.execute(
                "INSERT INTO budget_alerts (budget_key, period_start, threshold, cost_micros, total_tokens) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (budget_key, period_start.isoformat(), repr(float(threshold)), spend.cost_micros,
                 spend.total_tokens))
            return cur.rowcount == 1

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
