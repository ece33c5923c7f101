"""Configuration reload of a collector worker (SIGHUP), applied by the runtime between batches.

The file is validated whole (:func:`gateway_tap.settings.load_config`), then the
collector's ``config`` against its schema; a rejected file is logged with the key
path and changes nothing. Applied live: ``batch``, ``retry``, ``shutdown_grace_s``
and the collector's ``config``. A changed ``config`` goes to the collector's
``on_config_change(config)`` when it has one; otherwise the collector is closed and
a fresh instance initialised with the new config. Both happen between batches, after
the previous batch was flushed and committed, so no event is lost or half-written.
Everything else (group, membership, fetch sizes, metrics port, ``kafka``) needs a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collectors.config import validate_collector_config
from collectors.sdk import ConfigError, DataCollector
from gateway_tap.config_reload import ReloadMetrics, changed_keys
from gateway_tap.settings import CollectorSettings

if TYPE_CHECKING:
    from collectors.runtime import CollectorRuntime
    from gateway_tap.settings import GatewayConfig

log = logging.getLogger("gateway_tap.collectors.reload")

LIVE_KEYS = ("batch", "retry", "shutdown_grace_s", "config")
RESTART_KEYS = ("plugin", "group_id", "group_instance_id", "session_timeout_ms", "max_poll_interval_ms",
                "fetch_max_bytes", "max_partition_fetch_bytes", "auto_offset_reset", "metrics")


class CollectorReloader:
    """Re-reads ``path`` for collector ``runtime.name`` when asked; :meth:`apply` runs between batches."""

    def __init__(self, runtime: CollectorRuntime, path: str | Path, overrides: Mapping[str, str] | None = None) -> None:
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
        restart = changed_keys(old, settings, RESTART_KEYS) + \
            (["kafka"] if "root_config" in rt.extras and changed_keys(rt.extras["root_config"], root, ["kafka"])
             else [])
        try:
            if settings.config != old.config:
                await self._apply_collector_config(config, root)
        except Exception:
            log.exception("collector %s: applying the new config failed; the configuration in force stays",
                          rt.name)
            self.metrics.rejected("failed")
            return False
        rt.settings = old.model_copy(update={key: getattr(settings, key) for key in LIVE_KEYS})
        rt.extras["root_config"] = root
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
        from gateway_tap.settings import load_config

        root = load_config(self.path)
        rt = self.runtime
        settings = root.collectors.get(rt.name) or CollectorSettings.model_validate({})
        if self.overrides:
            settings = settings.model_copy(update=self.overrides)
        config = validate_collector_config(rt.name, rt.collector_cls, settings.config)
        return root, settings, config

    async def _apply_collector_config(self, config: dict[str, Any], root: GatewayConfig) -> None:
        rt = self.runtime
        collector = rt.collector
        assert collector is not None and rt.services is not None
        notify = getattr(collector, "on_config_change", None)
        if notify is not None:
            await notify(config)
            return
        # Between batches the previous batch is flushed and committed: closing loses nothing.
        services = rt.services
        services.extras["root_config"] = root
        fresh: DataCollector = rt.collector_cls()
        await collector.close()
        try:
            await fresh.initialize(config, services)
        except Exception:
            # The old one is closed: bring it back with its old config before reporting the failure.
            services.extras["root_config"] = rt.extras.get("root_config")
            back: DataCollector = rt.collector_cls()
            old_config = validate_collector_config(rt.name, rt.collector_cls, rt.settings.config)
            await back.initialize(old_config, services)
            rt.collector = back
            raise
        rt.collector = fresh
