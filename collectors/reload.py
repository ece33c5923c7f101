"""Configuration reload of a collector worker (SIGHUP), applied by the runtime between batches.

The file is validated whole (:func:`gateway_tap.settings.load_config`), then the
collector's ``config`` against its declaration; a rejected file is logged with the key
path and changes nothing. Applied live: the fields of
:class:`~gateway_tap.settings.CollectorSettings` not marked ``RESTART`` (``batch``, ``max_in_flight_*``, ``retry``,
``shutdown_grace_s``, ``config``) and the root sections a collector falls back on
(``services.defaults``: ``budgets``, ``budget_store``). A changed ``config`` goes to the
collector's ``on_config_change(config)`` when it has one; otherwise (and when its defaults
changed) the collector is closed and a fresh instance initialised. Both happen between
batches, after the previous batch was flushed and committed, so no event is lost or
half-written. Fields marked ``RESTART`` (group, membership, fetch sizes, metrics port) and
``kafka`` need a restart: they are reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from collectors.config import validate_collector_config
from collectors.sdk import CollectorServices, ConfigError, DataCollector
from gateway_tap.apps import AppIndex
from gateway_tap.config_reload import ReloadMetrics, changed_keys
from gateway_tap.services import Gateway
from gateway_tap.settings import CollectorDefaults, CollectorSettings, GatewayConfig, load_config
from gateway_tap.settings.base import live_keys, restart_keys

log = logging.getLogger("gateway_tap.collectors.reload")

LIVE_KEYS = live_keys(CollectorSettings)
RESTART_KEYS = restart_keys(CollectorSettings)
ROOT_RESTART_KEYS = ("kafka",)
"""The root sections a collector worker reads once at start (its ``services.defaults`` are applied live)."""


class _HasRegistry(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...


class ReloadTarget(Protocol):
    """What the reloader reads and replaces on the runtime it reloads (:class:`collectors.runtime.CollectorRuntime`)."""

    name: str
    settings: CollectorSettings
    root: GatewayConfig | None
    collector_cls: type[DataCollector]
    collector: DataCollector | None
    services: CollectorServices | None
    gateway: Gateway

    @property
    def metrics(self) -> _HasRegistry: ...


class CollectorReloader:
    """Re-reads ``path`` for collector ``runtime.name`` when asked; :meth:`apply` runs between batches."""

    def __init__(self, runtime: ReloadTarget, path: str | Path, overrides: Mapping[str, str] | None = None) -> None:
        self.runtime = runtime
        self.path = Path(path)
        self.overrides = dict(overrides or {})
        self.metrics = ReloadMetrics(runtime.metrics.registry, "gateway_tap_collector_", {"collector": runtime.name})
        self.generation = 0
        self.requested = False

    def request(self) -> None:
        """Ask for a reload at the next batch boundary (safe from a signal handler)."""
        self.requested = True

    async def apply(self) -> bool:
        """Reload now (the runtime calls this between batches). False when the file was rejected."""
        self.requested = False
        rt = self.runtime
        try:
            root, settings, config = await asyncio.to_thread(self._validate)
        except (ValueError, ConfigError) as exc:  # ConfigFileError is a ValueError
            log.error("collector %s: configuration reload rejected; the configuration in force stays: %s",
                      rt.name, exc, extra={"collector": rt.name, "generation": self.generation})
            self.metrics.rejected("invalid")
            return False
        old = rt.settings
        restart = changed_keys(old, settings, RESTART_KEYS)
        if rt.root is not None:
            restart += changed_keys(rt.root, root, ROOT_RESTART_KEYS)
        defaults = root.collector_defaults()
        try:
            assert rt.services is not None
            if settings.config != old.config or defaults != rt.services.defaults:
                await self._apply_collector_config(config, defaults)
        except Exception:
            log.exception("collector %s: applying the new config failed; the configuration in force stays",
                          rt.name)
            self.metrics.rejected("failed")
            return False
        rt.settings = old.model_copy(update={key: getattr(settings, key) for key in LIVE_KEYS})
        rt.root = root
        rt.gateway.use_config(AppIndex(root.apps), root.llms)  # the collector's gateway lookups follow the file
        self.generation += 1
        self.metrics.succeeded(self.generation)
        log.info("collector %s: configuration reloaded: generation %d", rt.name, self.generation,
                 extra={"collector": rt.name, "generation": self.generation,
                        "changed": changed_keys(old, settings, LIVE_KEYS)})
        if restart:
            log.warning("collector %s: changed settings take effect only after a restart: %s", rt.name,
                        ", ".join(restart), extra={"collector": rt.name, "keys": restart})
        return True

    def _validate(self) -> tuple[GatewayConfig, CollectorSettings, dict[str, Any]]:
        root = load_config(self.path)
        rt = self.runtime
        settings = root.collectors.get(rt.name) or CollectorSettings.model_validate({})
        if self.overrides:
            settings = settings.model_copy(update=self.overrides)
        config = validate_collector_config(rt.name, rt.collector_cls, settings.config)
        return root, settings, config

    async def _apply_collector_config(self, config: dict[str, Any], defaults: CollectorDefaults) -> None:
        """Hand the collector its new config and defaults: ``on_config_change`` if it has one, else a fresh
        instance. On failure the collector in force keeps (or gets back) its old config and defaults."""
        rt = self.runtime
        collector, services = rt.collector, rt.services
        assert collector is not None and services is not None
        old_defaults, services.defaults = services.defaults, defaults
        notify = getattr(collector, "on_config_change", None)
        if notify is not None:
            try:
                await notify(config)
            except Exception:
                services.defaults = old_defaults
                raise
            return
        # Between batches the previous batch is flushed and committed: closing loses nothing.
        fresh: DataCollector = rt.collector_cls()
        await collector.close()
        try:
            await fresh.initialize(config, services)
        except Exception:
            # The old one is closed: bring it back with its old config before reporting the failure.
            services.defaults = old_defaults
            back: DataCollector = rt.collector_cls()
            old_config = validate_collector_config(rt.name, rt.collector_cls, rt.settings.config)
            await back.initialize(old_config, services)
            rt.collector = back
            raise
        rt.collector = fresh
