"""Raises an alert on the control topic when an app's upstream errors pass a threshold in a time window.

    gateway-tap collect error-alerts --config gateway-tap.yaml

with, in the config file::

    collectors:
      error-alerts:
        plugin: gateway_tap.examples.collectors.error_alerts:ErrorAlerts
        config: {threshold: 20, window_s: 60}

It reads ``proxy_log`` events and uses the collector services the way a tap plugin would: ``kv`` for the
counters, ``gateway`` to name the app in the alert (from the config file in force), and
``send_to_control`` for an ``error_rate`` message (``plugin`` = the collector's name) that any collector
with ``handle_control`` receives. The alert is acknowledged by Kafka before the batch that raised it is
committed; after a crash the batch is handled again and the alert may be sent twice (same window, new id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from collectors.sdk import CollectorServices, DataCollector
from schemas import ProxyLog

KIND = "error_rate"


class ErrorAlertsConfig(BaseModel):
    """``collectors.<NAME>.config`` of :class:`ErrorAlerts`."""

    model_config = ConfigDict(extra="forbid")

    threshold: int = Field(default=20, ge=1, description="Errors of one app in one window that raise the alert.")
    window_s: int = Field(default=60, ge=1, description="Length of a window (by the events' emitted_at).")
    min_status: int = Field(default=500, ge=400, le=599, description="Statuses from this one up count as errors.")


class ErrorAlerts(DataCollector):
    """Counts error responses per app and window; one ``error_rate`` control message when a count reaches
    the threshold."""

    Config: ClassVar[type[BaseModel]] = ErrorAlertsConfig

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        self.settings = ErrorAlertsConfig.model_validate(config)

    async def on_config_change(self, config: dict[str, Any]) -> None:
        self.config, self.settings = config, ErrorAlertsConfig.model_validate(config)

    async def handle_proxy_log_batch(self, events: Sequence[ProxyLog]) -> None:
        config = self.settings
        kv = self.services.kv
        for event in events:
            if event.status_code < config.min_status or event.app_id is None:
                continue
            # A redelivered event (same id) must not count twice: remember ids for two windows.
            if await kv.get(f"seen:{event.id}") is not None:
                continue
            await kv.set(f"seen:{event.id}", 1, ttl_s=2 * config.window_s)
            window_start = int(event.emitted_at.timestamp()) // config.window_s * config.window_s
            errors = await kv.incr(f"errors:{event.app_id}:{window_start}", ttl_s=2 * config.window_s)
            if errors == config.threshold:
                app = self.services.gateway.get_app(event.app_id)
                self.services.send_to_control(KIND, {
                    "app_id": event.app_id,
                    "app_name": app.name if app is not None else None,
                    "window_start": window_start,
                    "window_s": config.window_s,
                    "errors": errors,
                    "threshold": config.threshold,
                    "last_status": event.status_code,
                })
