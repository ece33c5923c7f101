"""Blocks requests whose prompt matches a configured regular expression (403, ``prompt_blocked``).

config::

    patterns:                       # Python regular expressions, matched case-insensitively
      - "ignore (all )?previous instructions"
      - "\\b\\d{3}-\\d{2}-\\d{4}\\b"   # US social security numbers
    message: "request blocked by the prompt firewall"

Looks at chat ``messages`` (OpenAI and Anthropic), ``system``, ``prompt`` and
``input``. Fails closed: a body it cannot read as JSON (whatever its content type says, e.g. ``text/plain``
with a lone surrogate escape that an upstream's parser may well accept) is refused with 400
``prompt_unreadable`` rather than forwarded unchecked. Serves ``GET /plugins/<name>/stats`` with the number of
blocked requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway_tap.hooks import Endpoint, HookContext, HookResult, PluginServices, TapRequest


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                yield item
            elif isinstance(item, dict):
                yield from _texts(item.get("text"))
                yield from _texts(item.get("content"))
    elif isinstance(value, dict):
        yield from _texts(value.get("text"))


def prompt_texts(body: Any) -> Iterator[str]:
    if not isinstance(body, dict):
        return
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            yield from _texts(message.get("content"))
    for key in ("system", "prompt", "input"):
        yield from _texts(body.get(key))


class PromptFirewall:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["patterns"],
                "properties": {"patterns": {"type": "array", "items": {"type": "string", "minLength": 1}},
                               "message": {"type": "string"}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        patterns = list(config["patterns"])
        for i, pattern in enumerate(patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"patterns[{i}] is not a valid regular expression: {exc}") from None
        # One alternation, so a prompt is scanned once however many patterns there are.
        self.regex = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None
        self.message = str(config.get("message", "request blocked by the prompt firewall"))
        self.services = services

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        if self.regex is None or not request.body:
            return None
        try:
            body = request.json()
        except orjson.JSONDecodeError:  # unreadable to us is not harmless: the upstream may read it otherwise
            await self.services.kv.incr("blocked")
            ctx.log.info("prompt unreadable")
            return HookResult.stop(400, f"{self.message}: the request body is not JSON the firewall can read",
                                   code="prompt_unreadable")
        for text in prompt_texts(body):
            if self.regex.search(text):
                await self.services.kv.incr("blocked")
                ctx.log.info("prompt blocked")
                return HookResult.stop(403, f"{self.message}: the prompt matches a blocked pattern",
                                       code="prompt_blocked")
        return None

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "stats", self.stats)]

    async def stats(self, request: web.Request, ctx: HookContext) -> web.StreamResponse:
        blocked = await self.services.kv.get("blocked") or 0
        return web.Response(body=orjson.dumps({"blocked": blocked}), content_type="application/json")
