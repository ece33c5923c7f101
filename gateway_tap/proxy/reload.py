"""Live configuration reload of one tap worker (SIGHUP, or ``tap.reload.watch``).

A reload validates the file (:func:`load_config`), loads the plugins against the
ones in force (unchanged ones keep their instance and state, changed ones are
told through ``on_config_change`` or re-initialised), composes the chains and
upstreams into a new :class:`ConfigSnapshot` and swaps the handler's reference to it:
requests already running finish with the snapshot they started with. Plugins the
new snapshot no longer uses are closed once no older snapshot has a request in
flight. Any failure before the swap leaves the configuration in force untouched.

What grows with the configuration (the admin state's overlay, the app index over every key) is built in a
thread, so a reload at ten thousand apps never stalls the requests on the loop; the swap itself, on the loop,
is a few reference assignments with no ``await`` between them: a request sees the old or the new
configuration, never a mix.

Settings bound to sockets, processes or connections need a restart and are only
reported when they change: see :data:`RESTART_KEYS` (``docs/configuration.md`` lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry

from gateway_tap.apps import AppIndex
from gateway_tap.config_reload import FileFingerprint, ReloadMetrics, changed_keys
from gateway_tap.plugins.endpoints import EndpointRoutes
from gateway_tap.plugins.loader import LoadedPlugin, PluginLoadError, close_plugins
from gateway_tap.proxy.snapshot import ConfigSnapshot
from gateway_tap.proxy.upstream import Upstream
from gateway_tap.settings import ConfigFileError, GatewayConfig, LLMConfig, PluginConfig, load_config
from gateway_tap.settings.base import restart_keys

log = logging.getLogger("gateway_tap.reload")

LoadFn = Callable[[list[PluginConfig], Sequence[LoadedPlugin]], Awaitable[list[LoadedPlugin]]]
"""Load the plugins section against the plugins in force (:func:`load_plugins` with the tap's services)."""
ComposeFn = Callable[[GatewayConfig, Sequence[LoadedPlugin]], tuple[dict[str, Upstream], EndpointRoutes]]
"""Build the per-LLM upstreams with their hook chains (built-in steps included) and the plugin endpoints."""
OverlayFn = Callable[[GatewayConfig], Awaitable[GatewayConfig]]
"""What the file's configuration becomes before it is applied (e.g. the admin API's state on top); awaited under
the reloader's lock, so one runs at a time."""
RecoverFn = Callable[[GatewayConfig, Sequence[LoadedPlugin], PluginLoadError], Awaitable[GatewayConfig | None]]
"""Given the file's configuration, the plugins in force and why the overlaid plugins failed to load: the overlaid
configuration without what failed (to load instead), or None (nothing to leave out: the reload is rejected)."""

RESTART_KEYS = restart_keys(GatewayConfig)
"""Read once at start (marked ``RESTART`` in :mod:`gateway_tap.settings`): a change is logged and takes effect
at the next restart."""

DRAIN_POLL_S = 0.05


class _SnapshotHolder(Protocol):
    snapshot: ConfigSnapshot


class _ConfigUser(Protocol):
    def use_config(self, apps: AppIndex, llms: Sequence[LLMConfig]) -> None: ...


class _HasRegistry(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...


class ReloadTarget(Protocol):
    """What the reloader reads and swaps on the tap worker it reloads (:class:`gateway_tap.proxy.app.TapApp`;
    an optional ``budget`` with ``reconfigure(budgets, enforcement)`` takes new budgets live)."""

    @property
    def snapshot(self) -> ConfigSnapshot: ...

    @property
    def handler(self) -> _SnapshotHolder: ...

    @property
    def gateway(self) -> _ConfigUser: ...

    @property
    def metrics(self) -> _HasRegistry: ...


class ConfigReloader:
    """Reloads ``config_path`` into ``tap``; one per worker, reloads run one at a time."""

    def __init__(self, tap: ReloadTarget, config_path: str | Path | None, *, load: LoadFn, compose: ComposeFn) -> None:
        self.tap = tap
        self.path = Path(config_path) if config_path is not None else None
        self._load = load
        self._compose = compose
        self.metrics = ReloadMetrics(tap.metrics.registry, "gateway_tap_")
        self.generation = 0
        self._lock = asyncio.Lock()
        self._fingerprint = FileFingerprint(self.path) if self.path is not None else None
        self._draining: list[ConfigSnapshot] = []
        self._retiring: list[LoadedPlugin] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self.file_config: GatewayConfig = tap.snapshot.config
        """The file's configuration in force, before :attr:`overlay`."""
        self.overlay: OverlayFn | None = None
        """What the file's configuration becomes before it is applied (the admin API's state on top)."""
        self.recover: RecoverFn | None = None
        """When the plugins of the overlaid configuration fail to load, what to load instead (:data:`RecoverFn`):
        the admin state's entries that fail are left out and the rest applies."""

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Remember the file as loaded and start polling it (only acts while ``tap.reload.watch`` is on)."""
        if self._fingerprint is not None and self._watcher is None:
            await asyncio.to_thread(self._fingerprint.remember)
            self._watcher = asyncio.create_task(self._watch(), name="config-watch")

    async def stop(self) -> None:
        """Stop watching, wait for a reload in progress, close plugins still waiting for their requests."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        async with self._lock:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            retiring, self._retiring = self._retiring, []
            await close_plugins(retiring)

    def request(self, reason: str = "SIGHUP") -> None:
        """Schedule a reload from the file (safe to call from a signal handler on the loop)."""
        if self.path is None:
            log.warning("reload requested (%s) but the tap was not started from a file", reason)
            return
        self._spawn(self.reload_file(reason))

    def _spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self) -> None:
        assert self._fingerprint is not None
        while True:
            settings = self.tap.snapshot.config.tap.reload
            await asyncio.sleep(settings.interval_s)
            if self.tap.snapshot.config.tap.reload.watch and await asyncio.to_thread(self._fingerprint.changed):
                await self.reload_file("file changed")

    # -- reloading -------------------------------------------------------------------------------------------

    async def reload_file(self, reason: str = "SIGHUP") -> bool:
        """Validate and apply the file. False when rejected (logged with every key path; nothing changed)."""
        assert self.path is not None
        async with self._lock:
            if self._fingerprint is not None:
                await asyncio.to_thread(self._fingerprint.remember)
            try:
                config = await asyncio.to_thread(load_config, self.path)
            except ConfigFileError as exc:
                log.error("configuration reload rejected (%s); the configuration in force stays: %s", reason, exc,
                          extra={"problems": exc.problems, "generation": self.generation})
                self.metrics.rejected("invalid")
                return False
            ok = await self._apply_locked(await self._overlaid(config), reason, config)
            if ok:
                self.file_config = config
            return ok

    async def reapply(self, reason: str) -> bool:
        """Apply the file's configuration in force through :attr:`overlay` again (its input changed). Nothing
        happens (and True is returned) when the result is the configuration in force."""
        async with self._lock:
            config = await self._overlaid(self.file_config)
            # Compared off the loop: unchanged entries are the same objects (cheap), but a config of ten thousand
            # apps that differs late is a long walk.
            if await asyncio.to_thread(operator.eq, config, self.tap.snapshot.config):
                return True
            return await self._apply_locked(config, reason, self.file_config)

    async def _overlaid(self, config: GatewayConfig) -> GatewayConfig:
        return config if self.overlay is None else await self.overlay(config)

    async def apply(self, config: GatewayConfig, reason: str = "apply") -> bool:
        """Apply an already validated config (tests, embedding). False when a plugin rejected it."""
        async with self._lock:
            return await self._apply_locked(config, reason)

    async def _apply_locked(self, config: GatewayConfig, reason: str, file_config: GatewayConfig | None = None,
                            ) -> bool:
        tap = self.tap
        old = tap.snapshot
        try:
            try:
                plugins = await self._load(config.plugins, old.plugins)
            except PluginLoadError as exc:
                if self.recover is None or file_config is None:
                    raise
                retry = await self.recover(file_config, old.plugins, exc)
                if retry is None:
                    raise
                plugins = await self._load(retry.plugins, old.plugins)
                config = retry
        except PluginLoadError as exc:
            log.error("configuration reload rejected (%s); the configuration in force stays: %s", reason,
                      "; ".join(exc.problems), extra={"problems": exc.problems, "generation": self.generation})
            self.metrics.rejected("invalid")
            return False
        try:
            apps = await asyncio.to_thread(AppIndex, config.apps)  # every key of every app: off the loop
            upstreams, endpoints = self._compose(config, plugins)
            new = ConfigSnapshot(self.generation + 1, config, plugins, upstreams, endpoints, apps)
        except Exception:
            log.exception("configuration reload failed (%s); the configuration in force stays", reason)
            await close_plugins([p for p in plugins if all(p.instance is not q.instance for q in old.plugins)])
            self.metrics.rejected("failed")
            return False
        self._swap(old, new)
        self._report(old, new, reason)
        return True

    def _swap(self, old: ConfigSnapshot, new: ConfigSnapshot) -> None:
        tap = self.tap
        tap.handler.snapshot = new  # the one reference requests read: from here on new requests see `new`
        tap.gateway.use_config(new.apps, new.config.llms)
        self.generation = new.generation
        self.metrics.succeeded(new.generation)
        self._update_budgets(old.config, new.config)
        self._update_rate_limits(old.config, new.config)
        kept = {id(p.instance) for p in new.plugins}
        retired = [p for p in old.plugins if id(p.instance) not in kept]
        # Only snapshots with requests in flight (and the one just replaced) can still reach old instances.
        self._draining = [s for s in self._draining if s.inflight > 0] + [old]
        if retired:
            self._retiring.extend(retired)
            self._spawn(self._close_when_drained(list(self._draining), retired, old.config))

    def _update_budgets(self, old: GatewayConfig, new: GatewayConfig) -> None:
        if changed_keys(old, new, ("budgets", "budget_enforcement")) == []:
            return
        gate = getattr(self.tap, "budget", None)
        update = getattr(gate, "reconfigure", None)
        if update is None:
            log.warning("budgets changed but budget enforcement %s; restart the tap to apply them",
                        "is off" if gate is None else "cannot take new budgets live")
            return
        update(new.budgets, new.budget_enforcement)

    def _update_rate_limits(self, old: GatewayConfig, new: GatewayConfig) -> None:
        if changed_keys(old, new, ("rate_limits", "rate_limiting")) == []:
            return
        gate = getattr(self.tap, "ratelimit", None)
        if gate is None:
            log.warning("rate limits changed but rate limiting is off in this tap; restart it to apply them")
            return
        gate.reconfigure(new.rate_limits, new.rate_limiting)

    async def _close_when_drained(self, snapshots: list[ConfigSnapshot], retired: list[LoadedPlugin],
                                  old: GatewayConfig) -> None:
        """Close ``retired`` once no request started under ``snapshots`` is running (bounded by the longest
        upstream timeout: a request cannot legitimately last longer)."""
        limit = max((llm.timeouts.total_s for llm in old.llms), default=0.0) + 5.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        # Polled: ``inflight`` is a bare counter so the hot path pays no more than an increment.
        while any(s.inflight > 0 for s in snapshots) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(DRAIN_POLL_S)
        if any(s.inflight > 0 for s in snapshots):
            log.warning("closing %d replaced plugin(s) with requests still in flight after %.0fs",
                        len(retired), limit)
        self._retiring = [p for p in self._retiring if p not in retired]
        await close_plugins(retired)
        log.info("closed replaced plugin(s) %s", ", ".join(p.name for p in retired))

    def _report(self, old: ConfigSnapshot, new: ConfigSnapshot, reason: str) -> None:
        before = {p.name: p for p in old.plugins}
        kept, told, fresh = [], [], []
        for plugin in new.plugins:
            prev = before.get(plugin.name)
            if prev is None or prev.instance is not plugin.instance:
                fresh.append(plugin.name)
            elif prev.settings.config != plugin.settings.config:
                told.append(plugin.name)
            else:
                kept.append(plugin.name)
        removed = [name for name in before if name not in {p.name for p in new.plugins}]
        restart = changed_keys(old.config, new.config, RESTART_KEYS)
        log.info("configuration reloaded (%s): generation %d", reason, new.generation, extra={
            "generation": new.generation, "plugins_kept": kept, "plugins_notified": told,
            "plugins_initialised": fresh, "plugins_removed": removed})
        if restart:
            log.warning("changed settings take effect only after a restart: %s", ", ".join(restart),
                        extra={"keys": restart})
