"""``tap``: the proxy process (listening socket, workers, limits, logging, event publishing, reload)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, model_validator

from gateway_tap.settings.admin import AdminSettings
from gateway_tap.settings.base import RESTART, Section
from gateway_tap.settings.publisher import PublisherSettings


class ListenSettings(Section):
    """Where the tap accepts client connections."""

    host: str = Field(default="127.0.0.1", description="Interface to bind (0.0.0.0 for all).")
    port: int = Field(default=8080, ge=0, le=65535, description="TCP port of the proxy.")


class TapMetricsSettings(Section):
    """The tap's Prometheus ``/metrics``, on a listener of its own: the metrics name every app and its spend, so
    they are never served on the proxy's port; keep the host private. ``port: null`` turns it off."""

    host: str = Field(default="127.0.0.1", description="Interface the metrics listener binds (loopback, or an "
                                                       "internal network a Prometheus scrapes from).")
    port: int | None = Field(default=9464, ge=0, le=65535,
                             description="TCP port of /metrics (every worker shares it); null: no metrics listener.")


class LimitSettings(Section):
    """Request limits enforced before anything is forwarded."""

    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")
    max_header_bytes: int = Field(default=8190, gt=0,
                                  description="Longest request header (name and value); longer get 431.")
    max_header_count: int = Field(default=128, gt=0, description="Most request headers; more get 431.")
    max_url_bytes: int = Field(default=8190, gt=0, description="Longest request URL; longer get 414.")
    header_timeout_s: float = Field(default=15.0, gt=0,
                                    description="From a connection's start, or the first byte of a request on a "
                                                "kept-alive one, until its request line and headers are complete; "
                                                "then the connection is closed.")
    body_timeout_s: float = Field(default=60.0, gt=0,
                                  description="Receiving a request's whole body once its headers are complete; "
                                              "longer gets 408 request_timeout and the connection is closed.")
    keepalive_timeout_s: float = Field(default=75.0, gt=0,
                                       description="A connection idle between requests is closed after this "
                                                   "(longer than a load balancer's idle timeout in front, e.g. "
                                                   "60 s).")


class ReloadSettings(Section):
    """Live configuration reload: always on SIGHUP; with ``watch`` also when the file's content changes."""

    watch: bool = Field(default=False, description="Poll the file and reload when its content changed.")
    interval_s: float = Field(default=2.0, gt=0, description="Polling interval of watch (stat; hashed only on change).")


class TapSettings(Section):
    """The proxy process: listening socket, workers, limits, logging and event publishing."""

    listen: Annotated[ListenSettings, RESTART] = Field(default_factory=ListenSettings)  # type: ignore[arg-type]
    workers: Annotated[int, RESTART] = Field(default=1, ge=1, le=64,
                                             description="Worker processes sharing the port (SO_REUSEPORT).")
    limits: Annotated[LimitSettings, RESTART] = Field(default_factory=LimitSettings)  # type: ignore[arg-type]
    access_log: bool = Field(default=True, description="One structured JSON log line per request.")
    log_level: Annotated[Literal["debug", "info", "warning", "error"], RESTART] = Field(
        default="info", description="Level of the tap's log.")
    capture_bodies: bool = Field(default=False, description="Put (truncated, redacted) bodies into proxy_log events.")
    body_capture_bytes: int = Field(default=4096, ge=0, description="Captured bodies are truncated to this many bytes.")
    upstream_max_connections: Annotated[int, RESTART] = Field(default=1000, ge=1,
                                                              description="Pooled upstream connections per worker.")
    publisher: Annotated[PublisherSettings, RESTART] = Field(default_factory=PublisherSettings)  # type: ignore[arg-type]
    shared_kv_path: Annotated[str | None, RESTART] = Field(
        default=None,
        description="SQLite file of the plugins' shared key-value store (plugins[].kv.backend: shared), shared by "
                    "this tap's worker processes; default <publisher.spool_dir>/plugin-kv.sqlite.")
    reload: ReloadSettings = Field(default_factory=ReloadSettings)  # type: ignore[arg-type]
    admin: Annotated[AdminSettings, RESTART] = Field(default_factory=AdminSettings)  # type: ignore[arg-type]
    metrics: Annotated[TapMetricsSettings, RESTART] = Field(
        default_factory=TapMetricsSettings)  # type: ignore[arg-type]
    trusted_proxies: Annotated[list[IPvAnyNetwork], RESTART] = Field(
        default_factory=list,
        description="Load balancers in front of the tap (addresses or CIDR networks, e.g. 10.0.0.0/8). For a "
                    "connection from one of them, the client address recorded (proxy_log, access log, hooks' "
                    "req.client_address) is the last X-Forwarded-For entry that is not itself a trusted proxy. "
                    "Empty: always the connection's peer (X-Forwarded-For is never believed).")

    @model_validator(mode="after")
    def _admin_port_is_not_the_proxy_port(self) -> TapSettings:
        admin = self.admin.listen
        if admin is not None and admin.port == self.listen.port:
            raise ValueError(f"tap.admin.listen.port {admin.port} is the proxy's port; the admin API needs its own")
        metrics = self.metrics.port
        if metrics and metrics == self.listen.port:
            raise ValueError(f"tap.metrics.port {metrics} is the proxy's port; /metrics needs a listener of its own")
        if metrics and admin is not None and metrics == admin.port:
            raise ValueError(f"tap.metrics.port {metrics} is tap.admin.listen.port; each needs its own")
        return self
