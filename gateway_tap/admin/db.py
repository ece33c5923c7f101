"""One SQL dialect over the budget store's two backends, for the admin state.

The admin state lives in the budget store's database (its tables come with the budget
store's migrations) but on connections of its own, so admin traffic never queues behind
the budget collector's batches. Statements are written once with ``?`` placeholders
(PostgreSQL gets ``$n``); values are text, integers, floats and NULL only.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

from gateway_tap.budgets.sqlite import sqlite_transaction
from gateway_tap.budgets.store import BudgetStoreError, StoreUnavailable, open_store
from gateway_tap.settings import BudgetStoreSettings

Row = tuple[Any, ...]


class Tx(ABC):
    """One transaction: statements run in order, committed together or not at all."""

    @abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; returns the rows it changed."""

    @abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query; returns its rows."""

    async def fetchone(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None


class Database(ABC):
    """Connections to the budget store's database. Create with :func:`connect`."""

    @abstractmethod
    def transaction(self, *, write: bool = True) -> AbstractAsyncContextManager[Tx]:
        """``async with db.transaction() as tx``: one transaction (``write=False``: read-only use)."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections; safe to call twice."""


class _SqliteTx(Tx):
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        cur = await self._conn.execute(sql, args)
        return cur.rowcount

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        async with self._conn.execute(sql, args) as cur:
            return [tuple(r) for r in await cur.fetchall()]


class SqliteDatabase(Database):
    """One connection (transactions serialised by a lock), WAL shared with the other processes."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, settings: BudgetStoreSettings) -> SqliteDatabase:
        path = Path(settings.sqlite_path)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None, timeout=settings.timeout_s)
            await conn.execute(f"PRAGMA busy_timeout = {int(settings.timeout_s * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"sqlite admin state unavailable: {exc}") from exc
        return cls(conn)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Tx]:
        if self._conn is None:
            raise BudgetStoreError("admin state database is closed")
        mode = "IMMEDIATE" if write else "DEFERRED"
        async with self._lock, sqlite_transaction(self._conn, mode, "admin state") as conn:
            yield _SqliteTx(conn)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


_PLACEHOLDER = re.compile(r"\?")


def _pg_sql(sql: str) -> str:
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _PgTx(Tx):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> int:
        status: str = await self._conn.execute(_pg_sql(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        return [tuple(r) for r in await self._conn.fetch(_pg_sql(sql), *args)]


class PostgresDatabase(Database):
    """An asyncpg pool; writes run serialisable-safe by taking the state row's lock first."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool: asyncpg.Pool | None = pool

    @classmethod
    async def open(cls, settings: BudgetStoreSettings) -> PostgresDatabase:
        try:
            pool = await asyncpg.create_pool(
                settings.dsn(), min_size=0, max_size=2, timeout=settings.timeout_s,
                command_timeout=settings.timeout_s,
                server_settings={"search_path": settings.postgres_schema,
                                 "application_name": "gateway-tap-admin"})
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgres admin state unavailable: {type(exc).__name__}: {exc}") from exc
        return cls(pool)

    @asynccontextmanager
    async def transaction(self, *, write: bool = True) -> AsyncIterator[Tx]:
        if self._pool is None:
            raise BudgetStoreError("admin state database is closed")
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=not write):
                yield _PgTx(conn)
        except BudgetStoreError:
            raise
        except (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(f"postgres admin state unavailable: {type(exc).__name__}: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise BudgetStoreError(f"postgres admin state error: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def apply_migrations(settings: BudgetStoreSettings) -> None:
    """Apply the budget store's pending migrations (the admin tables are among them).

    :raises StoreUnavailable: the database cannot be reached.
    """
    store = await open_store(settings, migrate=True)
    await store.close()


async def connect(settings: BudgetStoreSettings, *, migrate: bool = True) -> Database:
    """Open the admin state's connections (migrating the budget store's schema first unless ``migrate=False``).

    :raises StoreUnavailable: the database cannot be reached (PostgreSQL connects lazily: only when migrating).
    """
    if migrate:
        await apply_migrations(settings)
    if settings.backend == "postgres":
        return await PostgresDatabase.open(settings)
    return await SqliteDatabase.open(settings)


def is_unique_violation(exc: BaseException) -> bool:
    """True when ``exc`` (a :class:`BudgetStoreError`) came from a UNIQUE / PRIMARY KEY conflict."""
    cause = exc.__cause__
    return isinstance(cause, asyncpg.UniqueViolationError) or (
        isinstance(cause, sqlite3.IntegrityError) and "UNIQUE" in str(cause))
