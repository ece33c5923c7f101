"""Fixtures and helpers of the budget tests (a pytest plugin of tests/conftest.py).

``budget_store_settings`` runs a test once on SQLite and once on PostgreSQL (a schema of
its own in the run's database, so tests never see each other's rows).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from gateway_tap.budgets.periods import period_start
from gateway_tap.budgets.store import BudgetStore, open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.settings import BudgetStoreSettings, Period
from schemas import BudgetUsage

_seq = itertools.count()


@pytest.fixture(params=["sqlite", "postgres"])
def budget_store_settings(request: pytest.FixtureRequest, tmp_path: Path) -> BudgetStoreSettings:
    if request.param == "sqlite":
        return BudgetStoreSettings(backend="sqlite", sqlite_path=str(tmp_path / "budgets.sqlite3"))
    dsn = request.getfixturevalue("pg_dsn")
    return BudgetStoreSettings(backend="postgres", postgres_dsn=dsn, postgres_schema=f"b_{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def budget_store(budget_store_settings: BudgetStoreSettings) -> AsyncIterator[BudgetStore]:
    s = await open_store(budget_store_settings)
    try:
        yield s
    finally:
        await s.close()


def usage(app_id: str = "app", llm_id: str = "llm", cost: float = 0.01, tokens: int = 100,
          at: datetime | None = None, period: Period = "monthly", start: date | None = None,
          event_id: str | None = None, key_id: str | None = None) -> BudgetUsage:
    """A budget_usage event as the tap emits it (counted against the period containing ``at``)."""
    at = at or datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
    fields: dict[str, str] = {} if event_id is None else {"id": event_id}
    if key_id is not None:
        fields["key_id"] = key_id
    return BudgetUsage(gateway_id="test-tap", request_id=f"req-{next(_seq)}", app_id=app_id, llm_id=llm_id,
                       model="mock-model", prompt_tokens=tokens // 2, completion_tokens=tokens - tokens // 2,
                       total_tokens=tokens, cost=cost, period=period,
                       period_start=start or period_start(period, at), emitted_at=at, **fields)


class TcpRelay:
    """A TCP relay in front of a server that a test can cut (every connection dropped) to simulate an outage."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.difference_update((writer, up_writer))

    async def cut(self) -> None:
        """Stop accepting and drop every open connection (the port then refuses connections)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self._conns):
            conn.transport.abort()
        self._conns.clear()
