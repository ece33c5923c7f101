"""Caches LLM answers, whole and streamed; a hit answers without calling the upstream.

config::

    ttl_s: 300                 # how long an answer stays fresh
    max_entry_bytes: 262144    # larger answers (a whole body, or a whole stream) are not cached
    charge_hits: false         # true: a hit costs (and counts against budgets) like the original call
    per_app: false             # true: apps never share entries
    local_max_entries: 1024    # in-process copies per worker in front of the store (0: none)
    stats_flush_s: 1           # how often a worker adds its hit/miss/store counts to the store

Deploy it with the shared key-value store, so every worker process of the tap sees the
same entries, and bound its size there (the oldest entries are evicted first)::

    - name: response_cache
      use: gateway_tap.examples.plugins.response_cache:ResponseCache
      kv: {backend: shared, max_bytes: 67108864}
      config: {ttl_s: 300}

With several taps, ``kv: {backend: redis}`` shares the entries across every tap (the ``redis`` section;
bound the server with ``maxmemory`` and ``allkeys-lru``). Redis unreachable costs misses, never a request:
a lookup that fails is a miss and the answer is not stored, until Redis is back.

Key: LLM id, path, model and the SHA-256 of the request body as JSON with sorted keys
(so key order and whitespace do not matter), after the hooks that ran before this one; a
streamed request (``"stream": true``) is another entry than the same request whole.
Only ``POST`` JSON requests are looked up, and only 200 answers are stored: a whole body
when it is complete (``on_response_body``), a stream once it ended normally (OpenAI
``[DONE]``, Anthropic ``message_stop``; a stream cut short is never stored). A hit on a
stream is answered as a stream (``text/event-stream``), which the SDKs' streaming readers
read like the upstream's. ``cache-control: no-cache`` on the request skips the lookup;
``no-store`` on the request or on the upstream's answer skips storing. Every answer that
passes through carries ``x-cache: hit`` or ``x-cache: miss``.

A hit is answered with :meth:`HookResult.respond`, so the other response hooks still run
on it and the tap still emits its events: analytics with ``cache_hit: true``, zero upstream
latency and the cached answer's tokens; no cost and no budget usage unless ``charge_hits``.
For an OpenAI stream the entry keeps the upstream's usage report even when the client did
not ask for it (this plugin asks for it and withholds it from the client, as the tap does),
so a replayed stream is accounted with the original's exact tokens.

A hit is cheap: the entry is looked up in a bounded in-process LRU first (no thread hop, no
SQLite read), the shared store only on a local miss; stores and counters are written to the
shared store in the background, never on the request's path. An entry another worker's store
evicted may still be served from a local copy until its TTL ends.
``GET /plugins/<name>/stats`` reports hits, misses, stores and the store's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web

from gateway_tap.hooks import (
    Endpoint,
    HookContext,
    HookResult,
    KeyValueStore,
    PluginServices,
    StreamEvent,
    TapRequest,
    TapResponse,
)

_SEP = b"\n"
_MAX_PENDING_WRITES = 64
"""Background writes to the shared store at most; beyond it a new entry is kept locally only."""
_COUNTERS = ("hits", "misses", "stores")


def cache_key(llm_id: str, path: str, model: str | None, body: Any, app_id: str | None = None) -> str:
    """The entry key: readable prefix, then a digest of the normalised body."""
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    scope = f"{app_id}:" if app_id else ""
    return f"{scope}{llm_id}:{path}:{model or '-'}:{digest}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer; ``expires`` on the monotonic clock."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    expires: float

    @classmethod
    def decode(cls, stored: Any) -> Entry | None:
        """From the shared store's ``<head JSON>\\n<body>`` (None when absent, malformed or stale)."""
        if not isinstance(stored, bytes) or _SEP not in stored:
            return None
        head, _, body = stored.partition(_SEP)
        meta = orjson.loads(head)
        left_s = float(meta.get("expires_at", 0)) - time.time() if "expires_at" in meta else 1.0
        if left_s <= 0:
            return None
        return cls(int(meta["status"]), MappingProxyType({"content-type": meta["content_type"]}), body,
                   time.monotonic() + left_s)

    def encode(self, ttl_s: float) -> bytes:
        head = {"status": self.status, "content_type": self.headers["content-type"], "expires_at": time.time() + ttl_s}
        return orjson.dumps(head) + _SEP + self.body


def _usage_only(event: StreamEvent) -> bool:
    """OpenAI's final usage chunk (``choices: []`` and a ``usage`` object)."""
    if '"usage"' not in event.data:
        return False
    payload = event.json()
    return isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)


def _stream_ended(event: StreamEvent) -> bool:
    return event.done or event.event == "message_stop"


class ResponseCache:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False, "properties": {
            "ttl_s": {"type": "number", "exclusiveMinimum": 0},
            "max_entry_bytes": {"type": "integer", "minimum": 1},
            "charge_hits": {"type": "boolean"},
            "per_app": {"type": "boolean"},
            "local_max_entries": {"type": "integer", "minimum": 0},
            "stats_flush_s": {"type": "number", "exclusiveMinimum": 0}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.ttl_s = float(config.get("ttl_s", 300))
        self.max_entry_bytes = int(config.get("max_entry_bytes", 256 * 1024))
        self.charge_hits = bool(config.get("charge_hits", False))
        self.per_app = bool(config.get("per_app", False))
        self.local_max_entries = int(config.get("local_max_entries", 1024))
        self.kv: KeyValueStore = services.kv
        self.log = services.logger
        self.local: OrderedDict[str, Entry] = OrderedDict()
        self.counts = dict.fromkeys(_COUNTERS, 0)  # not yet added to the store's counters
        self._writes: set[asyncio.Task[None]] = set()
        self._flusher = asyncio.create_task(self._flush_every(float(config.get("stats_flush_s", 1.0))))

    async def close(self) -> None:
        self._flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._flusher
        await asyncio.gather(*self._writes, return_exceptions=True)
        await self._flush_counts()

    # -- hooks ---------------------------------------------------------------------------------------------------

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        if request.method != "POST" or not request.body:
            return None
        try:
            body = request.json()
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict):
            return None
        key = cache_key(ctx.llm_id, request.path, ctx.model, body, ctx.app_id if self.per_app else None)
        directives = request.headers.get("cache-control", "").lower()
        if "no-cache" not in directives:
            entry = self._local(key) or await self._shared(key)
            if entry is not None:
                ctx.state["hit"] = True
                self.counts["hits"] += 1
                return HookResult.respond(entry.status, entry.body, headers=entry.headers, cache_hit=True,
                                          charge=self.charge_hits)
        if "no-store" in directives:
            return None
        ctx.state["key"] = key  # the response hooks store the answer under it
        if body.get("stream") is True and ctx.vendor == "openai" and "chat/completions" in request.path:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Keep the usage report in the entry, so a replay is accounted exactly; this client never sees it.
                body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
                request.set_json(body)
                ctx.state["withhold_usage"] = True
        return None

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        state = ctx.state
        if state.get("hit"):
            response.headers["x-cache"] = "hit"
            return None
        response.headers["x-cache"] = "miss"
        if "key" in state:
            self.counts["misses"] += 1
            if response.status != 200 or "no-store" in response.headers.get("cache-control", "").lower():
                del state["key"]
            else:
                state["content_type"] = response.headers.get("content-type", "application/json")
        return None

    async def on_response_body(self, response: TapResponse, body: bytes, ctx: HookContext) -> HookResult | None:
        key = ctx.state.get("key")
        if key is not None and not ctx.state.get("hit") and len(body) <= self.max_entry_bytes:
            self._store(key, ctx.state["content_type"], body)
        return None

    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        state = ctx.state
        if state.get("hit"):
            return None
        key = state.get("key")
        if key is not None:
            parts: list[bytes] = state.setdefault("stream", [])
            parts.append(event.encode())
            size = state["stream_bytes"] = state.get("stream_bytes", 0) + len(parts[-1])
            if size > self.max_entry_bytes:
                del state["key"], state["stream"]
            elif _stream_ended(event):
                self._store(key, state["content_type"], b"".join(parts))
        if state.get("withhold_usage") and _usage_only(event):
            return HookResult.drop()
        return None

    # -- the two layers --------------------------------------------------------------------------------------

    def _local(self, key: str) -> Entry | None:
        entry = self.local.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self.local[key]
            return None
        self.local.move_to_end(key)
        return entry

    def _keep(self, key: str, entry: Entry) -> None:
        if self.local_max_entries <= 0:
            return
        self.local[key] = entry
        self.local.move_to_end(key)
        while len(self.local) > self.local_max_entries:
            self.local.popitem(last=False)

    async def _shared(self, key: str) -> Entry | None:
        try:
            entry = Entry.decode(await self.kv.get(key))
        except Exception as exc:  # a store problem must cost a cache miss, never the request
            self.log.warning("cache lookup failed: %r", exc)
            return None
        if entry is not None:
            self._keep(key, entry)
        return entry

    def _store(self, key: str, content_type: str, body: bytes) -> None:
        entry = Entry(200, MappingProxyType({"content-type": content_type}), body, time.monotonic() + self.ttl_s)
        self._keep(key, entry)
        self.counts["stores"] += 1
        if len(self._writes) >= _MAX_PENDING_WRITES:
            self.log.warning("cache store busy: %s kept in this worker only", key)
            return
        task = asyncio.create_task(self._write(key, entry.encode(self.ttl_s)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: str, value: bytes) -> None:
        try:
            await self.kv.set(key, value, ttl_s=self.ttl_s)
        except Exception as exc:
            self.log.warning("cache store failed: %r", exc)

    # -- counters ------------------------------------------------------------------------------------------------

    async def _flush_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._flush_counts()

    async def _flush_counts(self) -> None:
        for name in _COUNTERS:
            delta, self.counts[name] = self.counts[name], 0
            if delta:
                try:
                    await self.kv.incr(f"stats:{name}", delta)
                except Exception as exc:
                    self.log.warning("cache counter failed: %r", exc)

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint("GET", "stats", self.stats)]

    async def stats(self, request: web.Request, ctx: HookContext) -> web.StreamResponse:
        """Every worker's counts as of its last flush (this worker's up to now)."""
        await self._flush_counts()
        out: dict[str, Any] = {name: await self.kv.get(f"stats:{name}") or 0 for name in _COUNTERS}
        usage = getattr(self.kv, "usage", None)  # the shared store reports its size; the memory one does not
        if usage is not None:
            out["bytes"], out["entries"] = await usage()
        return web.Response(body=orjson.dumps(out), content_type="application/json")
