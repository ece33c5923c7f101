"""The runtime snapshot: everything a request reads from the configuration, built once per (re)load.

A request captures the snapshot in force when it starts (one attribute read) and uses
it to the end, so a reload never changes what a request in flight sees. A reload
builds a new snapshot and swaps one reference; ``inflight`` tells when the old one is
unused, so plugins it alone held can be closed.
"""

from __future__ import annotations

from typing import Any

from gateway_tap.apps import AppIndex
from gateway_tap.hooks import EndpointHandler, EndpointProvider
from gateway_tap.plugins.loader import LoadedPlugin
from gateway_tap.proxy.upstream import Upstream
from gateway_tap.settings import GatewayConfig

EndpointTable = dict[tuple[str, str], dict[str, tuple[LoadedPlugin, EndpointHandler]]]
"""(plugin name, path below /plugins/{name}/) -> method (or ``*``) -> plugin and handler."""


class ConfigSnapshot:
    """Configuration, app index, per-LLM upstreams (with their hook chains) and plugin endpoints.

    Immutable by convention except ``inflight``: the number of requests using it right now.
    """

    __slots__ = ("access_log", "apps", "body_limit", "capture_bodies", "config", "endpoints", "gateway_id",
                 "generation", "inflight", "plugins", "upstreams")

    def __init__(self, generation: int, config: GatewayConfig, plugins: list[LoadedPlugin],
                 upstreams: dict[str, Upstream], apps: AppIndex | None = None) -> None:
        self.generation = generation
        self.config = config
        self.plugins = plugins
        self.upstreams = upstreams
        self.apps = apps if apps is not None else AppIndex(config.apps)
        self.endpoints = _endpoint_table(plugins)
        tap = config.tap
        self.gateway_id = config.gateway_id
        self.capture_bodies = tap.capture_bodies
        self.body_limit = tap.body_capture_bytes
        self.access_log = tap.access_log
        self.inflight = 0

    def endpoint(self, plugin: str, path: str, method: str) -> tuple[LoadedPlugin, EndpointHandler] | None:
        """The plugin endpoint serving ``method`` on ``/plugins/{plugin}/{path}``, or None."""
        methods = self.endpoints.get((plugin, path))
        if methods is None:
            return None
        return methods.get(method) or methods.get("*") or (methods.get("GET") if method == "HEAD" else None)


def _endpoint_table(plugins: list[LoadedPlugin]) -> EndpointTable:
    table: EndpointTable = {}
    for plugin in plugins:
        instance: Any = plugin.instance
        if isinstance(instance, EndpointProvider):
            for endpoint in instance.endpoints():
                methods = table.setdefault((plugin.name, endpoint.path.lstrip("/")), {})
                methods[endpoint.method.upper()] = (plugin, endpoint.handler)
    return table
