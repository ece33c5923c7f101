"""Adds configured headers to the upstream request and string metadata (tags) to the events, and reports
how many requests it saw to the control plane. Runs in pre-auth and post-auth, as the seed's enricher does.

config::

    client_headers: {x-client-version: client_version}   # pre-auth: request header -> tag
    headers: {x-team: research}       # post-auth: set on the upstream request
    metadata: {cost_center: "42"}     # post-auth: carried into proxy_log.metadata and analytics.tags
    app_header: x-gateway-app         # also send the calling app's id under this header (optional)
    report_every_s: 60                # send counters to <prefix>.control this often (0 = never on a timer)
    report_every_requests: 0          # ... and after this many requests (0 = not by count)

Pre-auth runs before the caller is known, on every request: ``client_headers`` copies what the client
said about itself (its SDK version, a deployment name) into tags there, so a request refused by the key
check (401) or a later hook carries them in its ``proxy_log`` too. Values are cut at
``MAX_TAG_CHARS``, and credential headers (``authorization``, ``x-api-key``, ...) are refused by the
schema: a key must never reach the events.

The report is a control message of kind ``request_counts`` with the requests seen since
the previous report: ``{"requests": 5, "by_llm": {"openai": 3, "anthropic": 2}}``. Each
worker process reports its own deltas, and the rest is sent at shutdown, so summing the
reports of one ``gateway_id`` gives its total (``gateway_tap/examples/collectors/control_counters.py``
does that and exposes the sums as metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from gateway_tap.hooks import HEADER_NAME_SCHEMA, HEADERS_SCHEMA, HookContext, HookResult, PluginServices, TapRequest

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_CREDENTIALS = r"(?i)^(authorization|proxy-authorization|x-api-key|api-key|cookie|x-goog-api-key)$"
REPORT_KIND = "request_counts"
MAX_TAG_CHARS = 128
"""A client header copied into a tag is cut at this length (the client controls it)."""


class RequestEnricher:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False,
                "properties": {"client_headers": {
                                   **_STRING_MAP, "description": "Request header -> tag, copied in pre-auth.",
                                   "propertyNames": {"allOf": [HEADER_NAME_SCHEMA,
                                                               {"not": {"pattern": _CREDENTIALS}}]}},
                               "headers": HEADERS_SCHEMA, "metadata": _STRING_MAP, "app_header": HEADER_NAME_SCHEMA,
                               "report_every_s": {"type": "number", "minimum": 0},
                               "report_every_requests": {"type": "integer", "minimum": 0}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.client_headers: dict[str, str] = dict(config.get("client_headers", {}))
        self.headers: dict[str, str] = dict(config.get("headers", {}))
        self.metadata: dict[str, str] = dict(config.get("metadata", {}))
        self.app_header: str | None = config.get("app_header")
        self.services = services
        self.every_requests = int(config.get("report_every_requests", 0))
        self.by_llm: Counter[str] = Counter()
        every_s = float(config.get("report_every_s", 60))
        self._timer = asyncio.create_task(self._report_periodically(every_s)) if every_s > 0 else None

    async def pre_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        """Before authentication: tag the request with what the client said about itself."""
        tags = {tag: value[:MAX_TAG_CHARS] for header, tag in self.client_headers.items()
                if (value := request.headers.get(header)) is not None}
        return HookResult.modify(metadata=tags) if tags else None

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        self.by_llm[ctx.llm_id] += 1
        if self.every_requests and self.by_llm.total() >= self.every_requests:
            self.report()
        headers = dict(self.headers)
        if self.app_header and ctx.app_id:
            headers[self.app_header] = ctx.app_id
        return HookResult.modify(headers=headers, metadata=self.metadata)

    def report(self) -> None:
        """Send the counts since the last report (nothing when there were no requests)."""
        if not self.by_llm:
            return
        counts, self.by_llm = self.by_llm, Counter()
        try:
            self.services.send_to_control(REPORT_KIND, {"requests": counts.total(), "by_llm": dict(counts)})
        except RuntimeError:  # no control channel (e.g. a harness without one): counting is best effort
            pass

    async def _report_periodically(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            self.report()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        self.report()
