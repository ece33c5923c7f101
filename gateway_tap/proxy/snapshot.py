"""The runtime snapshot: everything a request reads from the configuration, built once per (re)load.

A request captures the snapshot in force when it starts (one attribute read) and uses
it to the end, so a reload never changes what a request in flight sees. A reload
builds a new snapshot and swaps one reference; ``inflight`` tells when the old one is
unused, so plugins it alone held can be closed.
"""

from __future__ import annotations

from gateway_tap.apps import AppIndex
from gateway_tap.plugins.endpoints import EndpointRoutes
from gateway_tap.plugins.loader import LoadedPlugin
from gateway_tap.proxy.redaction import Redactor
from gateway_tap.proxy.upstream import Upstream
from gateway_tap.settings import GatewayConfig


class ConfigSnapshot:
    """Configuration, app index, per-LLM upstreams (with their hook chains) and plugin endpoints.

    Immutable by convention except ``inflight``: the number of requests using it right now.
    """

    __slots__ = ("access_log", "apps", "body_limit", "capture_bodies", "config", "endpoints", "gateway_id",
                 "generation", "inflight", "plugins", "redactor", "upstreams")

    def __init__(self, generation: int, config: GatewayConfig, plugins: list[LoadedPlugin],
                 upstreams: dict[str, Upstream], endpoints: EndpointRoutes, apps: AppIndex | None = None) -> None:
        self.generation = generation
        self.config = config
        self.plugins = plugins
        self.upstreams = upstreams
        self.endpoints = endpoints
        self.apps = apps if apps is not None else AppIndex(config.apps)
        tap = config.tap
        self.gateway_id = config.gateway_id
        self.capture_bodies = tap.capture_bodies
        self.body_limit = tap.body_capture_bytes
        self.access_log = tap.access_log
        # The upstream keys are scrubbed verbatim from every record (an upstream may echo its key in an error).
        self.redactor = Redactor(up.credential[1].removeprefix("Bearer ") for up in upstreams.values()
                                 if up.credential is not None)
        self.inflight = 0
