"""Caches non-streamed LLM responses; a hit answers without calling the upstream.

config::

    ttl_s: 300                 # how long an answer stays fresh
    max_entry_bytes: 262144    # larger responses are not cached
    charge_hits: false         # true: a hit costs (and counts against budgets) like the original call
    per_app: false             # true: apps never share entries

Deploy it with the shared key-value store, so every worker process of the tap sees the
same entries, and bound its size there (the oldest entries are evicted first)::

    - name: response_cache
      use: gateway_tap.plugins.examples.response_cache:ResponseCache
      kv: {backend: shared, max_bytes: 67108864}
      config: {ttl_s: 300}

Key: LLM id, path, model and the SHA-256 of the request body as JSON with sorted keys
(so key order and whitespace do not matter), after the hooks that ran before this one.
Only ``POST`` JSON requests without ``"stream": true`` are looked up, and only 200
responses are stored. ``cache-control: no-cache`` on the request skips the lookup,
``no-store`` skips storing. Every response that passes through carries ``x-cache: hit``
or ``x-cache: miss``. A hit is answered with :meth:`HookResult.respond`, so the other
response hooks still run on it and the tap still emits all three events: analytics with
``cache_hit: true``, zero upstream latency and the cached response's tokens; no cost and
no budget usage unless ``charge_hits``. ``GET /plugins/<name>/stats`` reports hits,
misses, stores and the store's size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway_tap.hooks import Endpoint, HookContext, HookResult, PluginServices, TapRequest, TapResponse

_SEP = b"\n"


def cache_key(llm_id: str, path: str, model: str | None, body: Any, app_id: str | None = None) -> str:
    """The entry key: readable prefix, then a digest of the normalised body."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    scope = f"{app_id}:" if app_id else ""
    return f"{scope}{llm_id}:{path}:{model or '-'}:{digest}"


class ResponseCache:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False, "properties": {
            "ttl_s": {"type": "number", "exclusiveMinimum": 0},
            "max_entry_bytes": {"type": "integer", "minimum": 1},
            "charge_hits": {"type": "boolean"},
            "per_app": {"type": "boolean"}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.ttl_s = float(config.get("ttl_s", 300))
        self.max_entry_bytes = int(config.get("max_entry_bytes", 256 * 1024))
        self.charge_hits = bool(config.get("charge_hits", False))
        self.per_app = bool(config.get("per_app", False))
        self.kv = services.kv
        self.log = services.logger

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        if request.method != "POST" or not request.body:
            return None
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or body.get("stream") is True:
            return None
        key = cache_key(ctx.llm_id, request.path, ctx.model, body, ctx.app_id if self.per_app else None)
        directives = request.headers.get("cache-control", "").lower()
        if "no-store" not in directives:
            ctx.state["key"] = key  # the response hooks store the answer under it
        if "no-cache" in directives:
            return None
        try:
            entry = await self.kv.get(key)
        except Exception as exc:  # a store problem must cost a cache miss, never the request
            self.log.warning("cache lookup failed: %r", exc)
            return None
        if not isinstance(entry, bytes) or _SEP not in entry:
            return None
        head, _, cached = entry.partition(_SEP)
        meta = orjson.loads(head)
        ctx.state["hit"] = True
        await self._count("hits")
        return HookResult.respond(int(meta["status"]), cached, headers={"content-type": meta["content_type"]},
                                  cache_hit=True, charge=self.charge_hits)

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        if ctx.state.get("hit"):
            response.headers["x-cache"] = "hit"
            return None
        response.headers["x-cache"] = "miss"
        if "key" in ctx.state:
            await self._count("misses")
            if response.status == 200 and not response.streamed:
                ctx.state["content_type"] = response.headers.get("content-type", "application/json")
        return None

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        content_type = ctx.state.pop("content_type", None)  # set only for a cacheable miss: whole body, once
        if content_type is not None and len(chunk) <= self.max_entry_bytes:
            head = orjson.dumps({"status": 200, "content_type": content_type})
            try:
                await self.kv.set(ctx.state["key"], head + _SEP + chunk, ttl_s=self.ttl_s)
                await self._count("stores")
            except Exception as exc:
                self.log.warning("cache store failed: %r", exc)
        return chunk

    async def _count(self, name: str) -> None:
        try:
            await self.kv.incr(f"stats:{name}")
        except Exception as exc:
            self.log.warning("cache counter failed: %r", exc)

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "stats", self.stats)]

    async def stats(self, request: web.Request, ctx: HookContext) -> web.StreamResponse:
        out: dict[str, Any] = {name: await self.kv.get(f"stats:{name}") or 0 for name in ("hits", "misses", "stores")}
        usage = getattr(self.kv, "usage", None)  # the shared store reports its size; the memory one does not
        if usage is not None:
            out["bytes"], out["entries"] = await usage()
        return web.Response(body=orjson.dumps(out), content_type="application/json")
