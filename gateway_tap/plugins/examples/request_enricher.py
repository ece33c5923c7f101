"""Adds configured headers to the upstream request and string metadata (tags) to the events.

config::

    headers: {x-team: research}       # set on the upstream request
    metadata: {cost_center: "42"}     # carried into proxy_log.metadata and analytics.tags
    app_header: x-gateway-app         # also send the calling app's id under this header (optional)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway_tap.hooks import HookContext, HookResult, PluginServices, TapRequest

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


class RequestEnricher:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {"headers": _STRING_MAP, "metadata": _STRING_MAP, "app_header": {"type": "string"}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.headers: dict[str, str] = dict(config.get("headers", {}))
        self.metadata: dict[str, str] = dict(config.get("metadata", {}))
        self.app_header: str | None = config.get("app_header")

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        headers = dict(self.headers)
        if self.app_header and ctx.app_id:
            headers[self.app_header] = ctx.app_id
        return HookResult.modify(headers=headers, metadata=self.metadata)
