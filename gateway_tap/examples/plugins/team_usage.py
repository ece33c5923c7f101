"""One class, both runtimes: tags each request with the calling app's team in the tap, and keeps a cost ledger
per team as a collector. One ``Config`` serves both.

In the tap (``gateway-tap serve``), under ``plugins:``::

    - name: team_usage
      use: gateway_tap.examples.plugins.team_usage:TeamUsage
      config: {tag: team}

``post_auth`` reads ``ctx.app.metadata[tag]`` (the app's metadata, from the file or the admin API) and adds
it as the request's ``tag`` metadata (``proxy_log.metadata``, ``analytics.tags``); apps without it get
``default``.

As a collector (``gateway-tap collect gateway_tap.examples.plugins.team_usage:TeamUsage``), under
``collectors:`` with the same ``config`` plus the ledger::

    "gateway_tap.examples.plugins.team_usage:TeamUsage":
      config: {tag: team, ledger_path: /var/lib/gateway-tap/team-usage.sqlite3}

it reads the ``analytics`` events and upserts one row per event id (``id``, team, cost, tokens) into a SQLite
ledger, so a redelivered batch changes nothing: ``SELECT team, SUM(cost) FROM usage GROUP BY team``.

The class builds on both SDKs (``DataCollector`` for the collector, the hook signatures of
:mod:`gateway_tap.hooks`); gateway-tap itself keeps them apart: the tap's plugin loader recognises the
collector's ``Config`` and ``config_schema`` by their shape, and the collector runtime never sees the hooks.
``initialize`` gets the tap's services in the tap and the collector's in ``collect``: use what both have
(``kv``, ``logger``, ``gateway``, ``send_to_control``).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from collectors import CollectorServices, ConfigError, DataCollector, RetryLater
from gateway_tap.hooks import HookContext, HookResult, TapRequest
from gateway_tap.settings import Section
from schemas import Analytics


class TeamUsageConfig(Section):
    """The config of :class:`TeamUsage`, in the tap and in ``collect`` alike."""

    tag: str = Field(default="team", min_length=1,
                     description="The app metadata key read in the tap, and the tag it writes and the ledger reads.")
    default: str = Field(default="unassigned", description="The tag's value for apps without that metadata.")
    ledger_path: str | None = Field(default=None,
                                    description="collect only: the SQLite ledger (required there).")


class TeamUsage(DataCollector):
    Config = TeamUsageConfig

    async def initialize(self, config: dict[str, Any], services: Any) -> None:
        """Both runtimes call it: ``services`` is a ``CollectorServices`` in ``collect``, the tap's otherwise."""
        await super().initialize(config, services)
        self.settings = TeamUsageConfig.model_validate(config)
        if isinstance(services, CollectorServices) and self.settings.ledger_path is None:
            raise ConfigError(f"collectors.{services.name}.config.ledger_path: required to run as a collector")
        self.pending: list[tuple[str, str, float, int]] = []
        self._db: sqlite3.Connection | None = None  # opened by the first flush: the tap never flushes

    # -- in the tap --------------------------------------------------------------------------------------------
    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        app = ctx.app
        team = app.metadata.get(self.settings.tag) if app is not None else None
        return HookResult.modify(metadata={self.settings.tag: str(team) if team is not None
                                           else self.settings.default})

    async def on_config_change(self, config: dict[str, Any]) -> None:
        self.settings = TeamUsageConfig.model_validate(config)  # one assignment: old or new, never half

    # -- in collect --------------------------------------------------------------------------------------------
    async def handle_analytics_batch(self, events: Sequence[Analytics]) -> None:
        tag, default = self.settings.tag, self.settings.default
        self.pending += [(e.id, e.tags.get(tag, default), e.cost, e.total_tokens) for e in events]

    async def flush(self) -> None:
        rows, self.pending = self.pending, []
        if rows:
            try:
                await asyncio.to_thread(self._upsert, rows)
            except sqlite3.OperationalError as exc:  # locked, disk full: the runtime retries the batch
                raise RetryLater(f"ledger: {exc}") from exc

    def _upsert(self, rows: list[tuple[str, str, float, int]]) -> None:
        if self._db is None:
            assert self.settings.ledger_path is not None  # checked in initialize
            self._db = sqlite3.connect(self.settings.ledger_path, check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS usage (id TEXT PRIMARY KEY, team TEXT NOT NULL, "
                             "cost REAL NOT NULL, tokens INTEGER NOT NULL)")
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO usage VALUES (?, ?, ?, ?)", rows)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
