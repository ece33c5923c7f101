"""``loop_monitor``: the event loop's health in every tap worker and collector worker."""

from __future__ import annotations

from pydantic import Field

from gateway_tap.settings.base import Section


class LoopMonitorSettings(Section):
    """Event-loop lag (``gateway_tap_event_loop_lag_seconds``) and, for debugging, what blocked the loop."""

    lag_interval_ms: float = Field(default=100.0, ge=1.0, le=60_000.0,
                                   description="How often the loop's lag is sampled (one timer per interval).")
    log_stalls_over_ms: float | None = Field(
        default=None, gt=0,
        description="Debug: a watchdog thread names what blocked the loop for longer than this (the callback's "
                    "stack, or a garbage collection) and logs the longest stall every 10 s. Off by default.")
