"""Adds headers to every response and rewrites text in the body (each streamed chunk included).

config::

    headers: {x-served-by: gateway-tap}
    replace: {"forbidden word": "[removed]"}   # literal, case-sensitive, applied per chunk

Streamed replacements apply per chunk: a match split across two chunks is not seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway_tap.hooks import HEADERS_SCHEMA, HookContext, HookResult, PluginServices, TapResponse

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


class ResponseModifier:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {"headers": HEADERS_SCHEMA, "replace": _STRING_MAP}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.headers: dict[str, str] = dict(config.get("headers", {}))
        self.replace = [(k.encode(), v.encode()) for k, v in config.get("replace", {}).items() if k]

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        response.headers.update(self.headers)
        return None

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        for old, new in self.replace:
            if old in chunk:
                chunk = chunk.replace(old, new)
        return chunk
