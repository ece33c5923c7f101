"""The tap worker's side of the admin API (:mod:`gateway_tap.admin`): it follows the shared admin state and,
with ``tap.admin.listen``, serves the API on its own socket.

The state is applied through the reload path: the file's configuration with the state on top
(:meth:`AdminState.overlay`) goes to :meth:`ConfigReloader.reapply`, so apps, keys and budgets
change like a SIGHUP changes them, plugins are told of a new config (``on_config_change``) or
re-initialised, and requests in flight finish with the snapshot they started with. A SIGHUP
reload puts the state on top of the new file the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway_tap.admin.api import AdminAPI
from gateway_tap.admin.db import apply_migrations, connect
from gateway_tap.admin.state import AdminState
from gateway_tap.admin.store import AdminStore
from gateway_tap.admin.sync import StateSync
from gateway_tap.plugins.services import ControlChannel
from gateway_tap.proxy.app import TapApp
from gateway_tap.proxy.budget import unenforced_report
from gateway_tap.settings import GatewayConfig

log = logging.getLogger("gateway_tap.admin")

AUDIT_KIND = "admin.audit"
"""``kind`` of the audit records on the control topic (``plugin`` is ``admin``)."""


class AdminLink:
    """One worker's admin state follower and (optionally) API server. Create with :meth:`open`."""

    def __init__(self, tap: TapApp, store: AdminStore, *, worker_index: int, workers: int) -> None:
        if tap.reloader is None:
            raise ValueError("the admin state needs a tap that can reload (create_app)")
        self.tap = tap
        self.reloader = tap.reloader
        self.store = store
        config = tap.config
        self.settings = config.tap.admin
        self.workers = workers
        self._state = AdminState()
        self._used: set[str] = set()
        self.sync = StateSync(store, self._apply, interval_s=self.settings.poll_interval_s,
                              gateway_id=config.gateway_id, worker=worker_index, used=self._take_used,
                              prepare=lambda: apply_migrations(config.budget_store))
        self._control = ControlChannel(tap.publisher, config.gateway_id, config.kafka.topic_prefix)
        self.api: AdminAPI | None = None
        self._runner: web.AppRunner | None = None

    @classmethod
    async def open(cls, tap: TapApp, *, worker_index: int = 0, workers: int = 1) -> AdminLink:
        """Connect to the budget store's database. A database that is down is no error here: the schema is
        migrated and the state read by the first poll that reaches it (logged until then), and API calls get 503.

        :raises gateway_tap.budgets.store.StoreUnavailable: the SQLite file cannot be opened.
        :raises ValueError: PostgreSQL without a DSN.
        """
        db = await connect(tap.config.budget_store, migrate=False)
        return cls(tap, AdminStore(db), worker_index=worker_index, workers=workers)

    async def start(self) -> None:
        """Apply the current state, follow it, and serve the API when ``tap.admin.listen`` is set."""
        self.reloader.overlay = self._overlay
        await self.sync.start()
        listen = self.settings.listen
        if listen is not None:
            self.api = AdminAPI(self.settings, self.store, self)
            self._runner = web.AppRunner(self.api.web_app, access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, listen.host, listen.port, reuse_port=self.workers > 1)
            await site.start()
            log.info("admin API serving", extra={"host": listen.host, "port": listen.port})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.sync.stop()
        self.reloader.overlay = None
        await self.store.close()

    # -- applying the state ----------------------------------------------------------------------------------

    def _overlay(self, file_config: GatewayConfig) -> GatewayConfig:
        return self._state.overlay(file_config, time.time())

    def _take_used(self) -> set[str]:
        """The keys used since the last call. A reload replaces the app index: what the replaced one saw was
        taken before (:meth:`_apply`); a SIGHUP loses at most one heartbeat of marks."""
        apps = self.tap.apps
        used, self._used = self._used | apps.used, set()
        apps.used = set()
        return used

    async def _apply(self, state: AdminState) -> bool:
        self._used |= self.tap.apps.used
        self.tap.apps.used = set()
        previous, self._state = self._state, state
        if self._overlay(self.file_config()) == self.tap.config:
            return True
        ok = await self.reloader.reapply(f"admin state version {state.version}")
        if not ok:
            self._state = previous
        return ok

    # -- AdminRuntime ----------------------------------------------------------------------------------------

    def file_config(self) -> GatewayConfig:
        return self.reloader.file_config

    def applied_version(self) -> int:
        return self.sync.applied_version

    async def refresh(self) -> None:
        await self.sync.poll()

    def budget_report(self, app_id: str, llm_id: str | None) -> dict[str, Any] | None:
        budget = self.tap.budget
        return budget.report(app_id, llm_id) if budget is not None else unenforced_report(app_id, llm_id)

    def audit(self, record: Mapping[str, Any]) -> None:
        self._control.send("admin", AUDIT_KIND, record)
