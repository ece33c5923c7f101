"""A live feed of the caller's budget standing as server-sent events: a streaming plugin endpoint.

config::

    interval_s: 5        # time between two events
    max_events: 720      # the stream ends after this many (a client reconnects for more)

``GET /plugins/<name>/events`` (authenticated with the app's key, like ``/llm/``) answers
``text/event-stream``: one ``event: budget`` per interval whose data is
``{"app_id", "seq", "budget"}`` (``budget`` is ``services.gateway.budget_status`` for the
calling app: spend, limits, % used per budget; null without budgets), then ``event: end``.
``?events=N`` asks for fewer events; ``?llm_id=ID`` narrows the budgets to one LLM.
The endpoint's timeout bounds only the time to the first byte, so the feed may run for hours.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway_tap.hooks import Endpoint, EndpointContext, PluginServices


class BudgetFeed:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False, "properties": {
            "interval_s": {"type": "number", "exclusiveMinimum": 0, "description": "Time between two events."},
            "max_events": {"type": "integer", "minimum": 1, "description": "Events per stream at most."}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.interval_s = float(config.get("interval_s", 5))
        self.max_events = int(config.get("max_events", 720))
        self.gateway = services.gateway

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "events", self.events)]

    async def events(self, request: web.Request, ctx: EndpointContext) -> web.StreamResponse:
        try:
            count = min(self.max_events, int(request.query.get("events", self.max_events)))
        except ValueError:
            raise web.HTTPBadRequest(text="events must be an integer") from None
        llm_id = request.query.get("llm_id") or None
        app_id = ctx.app_id or ""
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)  # the response starts here: the endpoint timeout stops counting
        for seq in range(count):
            if seq:
                await asyncio.sleep(self.interval_s)
            status = await self.gateway.budget_status(app_id, llm_id)
            data = orjson.dumps({"app_id": app_id, "seq": seq, "budget": status})
            await resp.write(b"event: budget\ndata: " + data + b"\n\n")
        await resp.write(b"event: end\ndata: {}\n\n")
        await resp.write_eof()
        return resp
