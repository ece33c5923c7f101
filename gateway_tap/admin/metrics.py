"""Prometheus metrics of the admin state and API, registered on the tap worker's registry (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

AUTH_FAILURE_REASONS = ("missing_admin_token", "invalid_admin_token", "read_only_token")


class AdminMetrics:
    """``gateway_tap_admin_*``: the state version a worker runs, the entries it left out, refused admin calls."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.version = Gauge("gateway_tap_admin_state_version", "Admin state version this worker runs (the lowest "
                             "live worker's with several).", registry=registry, multiprocess_mode="livemin")
        self.rejected = Gauge("gateway_tap_admin_rejected_entries", "Entries of the admin state this worker could "
                              "not apply and left out (GET /v1/status names them; the highest live worker's).",
                              registry=registry, multiprocess_mode="livemax")
        self.auth_failures = Counter("gateway_tap_admin_auth_failures", "Admin API calls refused by the token "
                                     "check, by reason.", ["reason"], registry=registry)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
