"""The tap worker's side of the admin API (:mod:`gateway_tap.admin`): it follows the shared admin state and,
with ``tap.admin.listen``, serves the API on its own socket.

The state is applied through the reload path: the file's configuration with the state on top
(:meth:`AdminState.overlay`) goes to :meth:`ConfigReloader.reapply`, so apps, keys and budgets
change like a SIGHUP changes them, plugins are told of a new config (``on_config_change``) or
re-initialised, and requests in flight finish with the snapshot they started with. A SIGHUP
reload puts the state on top of the new file the same way.

One bad entry never blocks the others: the overlay leaves out entries that fail their checks, and when
the plugins of the state fail to load (a config a plugin refuses on this host), each plugin entry of the
state that changed is tried alone (:func:`trial_plugin`); those that fail keep what runs (or the file's
entry) and the rest is applied. What is left out is logged, counted (``gateway_tap_admin_rejected_entries``)
and reported in ``admin_taps`` (``GET /v1/status``) until its entry changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from aiohttp import web

from gateway_tap.admin.api import AdminAPI
from gateway_tap.admin.db import apply_migrations, connect
from gateway_tap.admin.metrics import AdminMetrics
from gateway_tap.admin.state import AdminState, CheckedEntries, Overlay, Rejected
from gateway_tap.admin.store import AdminStore
from gateway_tap.admin.sync import StateSync
from gateway_tap.plugins.loader import LoadedPlugin, PluginLoadError, trial_plugin
from gateway_tap.plugins.services import ControlChannel
from gateway_tap.proxy.app import TapApp
from gateway_tap.proxy.budget import unenforced_report
from gateway_tap.proxy.protocol import TapRunner
from gateway_tap.settings import GatewayConfig, PluginConfig

log = logging.getLogger("gateway_tap.admin")

AUDIT_KIND = "admin.audit"
"""``kind`` of the audit records on the control topic (``plugin`` is ``admin``)."""


def overlay_state(state: AdminState, file_config: GatewayConfig, now_s: float,
                  failing: Mapping[str, tuple[PluginConfig, str]], running: Mapping[str, PluginConfig],
                  checked: CheckedEntries) -> tuple[Overlay, dict[str, tuple[PluginConfig, str]]]:
    """``state`` on ``file_config`` with the plugin entries that failed to load here (``failing``: the settings
    that failed, and why) pinned to what runs (``running``), unless their entry changed since; and ``failing``
    without the entries that changed (to be tried again). Reads only its arguments: safe in a thread."""
    result = state.overlay(file_config, now_s, checked=checked)
    candidates = {p.name: p for p in result.config.plugins}
    failing = {name: bad for name, bad in failing.items() if candidates.get(name) == bad[0]}
    if failing:
        result = state.overlay(file_config, now_s, {name: running.get(name) for name in failing}, checked)
        file_names = {p.name for p in file_config.plugins}
        failed = [Rejected(f"plugins/{name}/config" if name in file_names else f"plugins/{name}", why)
                  for name, (_, why) in failing.items()]
        result = Overlay(result.config, tuple(sorted((*result.rejected, *failed), key=lambda r: r.entry)))
    return result, failing


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
        self.worker = worker_index
        self.metrics = AdminMetrics(tap.metrics.registry)
        self._state = AdminState()
        self._used: set[str] = set()
        self._failing: dict[str, tuple[PluginConfig, str]] = {}
        """Plugin entries of the state that failed to load here, by name: (the settings that failed, why)."""
        self._rejected: tuple[Rejected, ...] = ()
        self._checked = CheckedEntries()
        """The entries the last overlay built (:class:`CheckedEntries`): a change re-checks only what it touched."""
        self.sync = StateSync(store, self._apply, interval_s=self.settings.poll_interval_s,
                              gateway_id=config.gateway_id, worker=worker_index, used=self._take_used,
                              prepare=lambda: apply_migrations(config.budget_store), rejected=self.rejected)
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
        self.reloader.recover = self._recover
        await self.sync.start()
        listen = self.settings.listen
        if listen is not None:
            self.api = AdminAPI(self.settings, self.store, self, self.metrics)
            # TapRunner: a request the HTTP parser rejects gets a JSON error too, never aiohttp's plain text.
            self._runner = TapRunner(self.api.web_app, access_log=None, handle_signals=False)
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
        self.reloader.recover = None
        await self.store.close()

    # -- applying the state ----------------------------------------------------------------------------------

    async def _overlay(self, file_config: GatewayConfig) -> GatewayConfig:
        return (await self._overlaid(file_config)).config

    async def _overlaid(self, file_config: GatewayConfig) -> Overlay:
        """The state on ``file_config``, plugin entries known to fail here replaced by what runs; records what
        is left out. Built in a thread (tens of thousands of entries take most of a second to check): the loop
        keeps serving meanwhile, and what it serves changes only when the reloader swaps the result in. Runs
        under the reloader's lock (:data:`~gateway_tap.proxy.reload.OverlayFn`), so one at a time."""
        running = {p.name: p.settings for p in self.tap.snapshot.plugins}
        result, self._failing = await asyncio.to_thread(
            overlay_state, self._state, file_config, time.time(), self._failing, running, self._checked)
        self._set_rejected(result.rejected)
        return result

    async def _recover(self, file_config: GatewayConfig, running: Sequence[LoadedPlugin],
                       exc: PluginLoadError) -> GatewayConfig | None:
        """The overlaid plugins failed to load: try each plugin entry of the state that changed alone, remember
        those that fail (all of them when none fails alone: the running instance refused its new config), and
        return the overlay without them. None when no entry of the state changed a plugin (the file's fault)."""
        in_force = {p.name: p.settings for p in running}
        state_names = set(self._state.plugins) | set(self._state.plugin_configs)
        changed = [p for p in (await self._overlaid(file_config)).config.plugins
                   if p.name in state_names and p.enabled and in_force.get(p.name) != p]
        if not changed:
            return None
        for plugin in changed:
            problems = await trial_plugin(plugin, self.tap.gateway)
            if problems:
                self._failing[plugin.name] = (plugin, "; ".join(p.removeprefix("plugins[0].") for p in problems))
        if not any(p.name in self._failing for p in changed):
            why = "; ".join(exc.problems)
            self._failing.update({p.name: (p, why) for p in changed})
        return (await self._overlaid(file_config)).config

    def _set_rejected(self, rejected: tuple[Rejected, ...]) -> None:
        if rejected == self._rejected:
            return
        before = {r.entry for r in self._rejected}
        for r in rejected:
            if r.entry not in before:
                log.warning("admin state entry not applied: %s: %s", r.entry, r.error,
                            extra={"entry": r.entry, "error": r.error, "worker": self.worker})
        for entry in before - {r.entry for r in rejected}:
            log.info("admin state entry applied again: %s", entry, extra={"entry": entry, "worker": self.worker})
        self._rejected = rejected
        self.metrics.rejected.set(len(rejected))

    def rejected(self) -> tuple[Rejected, ...]:
        """The entries of the state this worker left out."""
        return self._rejected

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
        ok = await self.reloader.reapply(f"admin state version {state.version}")
        if not ok:
            self._state = previous
            self._set_rejected((*self._rejected, Rejected(
                "(state)", f"version {state.version} not applied: the configuration reload was rejected (see the "
                           "log); the state in force stays")))
        self.metrics.version.set(state.version)
        return ok

    # -- AdminRuntime ----------------------------------------------------------------------------------------

    def file_config(self) -> GatewayConfig:
        return self.reloader.file_config

    def applied_version(self) -> int:
        return self.sync.applied_version

    async def refresh(self) -> None:
        await self.sync.poll()

    async def check_plugin(self, plugin: PluginConfig) -> list[str]:
        return await trial_plugin(plugin, self.tap.gateway)

    def budget_report(self, app_id: str, llm_id: str | None, key_id: str | None = None) -> dict[str, Any] | None:
        budget = self.tap.budget
        return (budget.report(app_id, llm_id, key_id) if budget is not None
                else unenforced_report(app_id, llm_id, key_id))

    def audit(self, record: Mapping[str, Any]) -> None:
        self._control.send("admin", AUDIT_KIND, record)
