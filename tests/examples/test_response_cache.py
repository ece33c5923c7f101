"""The response cache example plugin through real HTTP: hits skip the upstream, events still flow (cache_hit,
zero upstream latency, no cost unless charge_hits), TTL, and the shared store across `serve --workers 2`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.hooks import HookContext, HookResult, TapResponse
from schemas import Analytics, BudgetUsage, ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
CACHE = "gateway_tap.examples.plugins.response_cache:ResponseCache"
ROOT = Path(__file__).resolve().parents[2]


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}


class WorkerPid:
    """Tags each response with the worker process that served it."""

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        response.headers["x-worker-pid"] = str(os.getpid())
        return None

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        return chunk


async def upstream_requests(mock_llm: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{mock_llm}/_mock/stats") as resp:
        return int((await resp.json())["requests"])


async def post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    # A new connection per request: with SO_REUSEPORT each one may land on another worker.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, \
            http.post(url, json=body, headers={"authorization": f"Bearer {APP_KEY}", **(headers or {})}) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


async def test_hits_skip_the_upstream_and_still_emit_events(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                            tmp_path: Path) -> None:
    plugins = [
        {"name": "cache", "use": CACHE, "llms": ["openai"], "config": {"ttl_s": 300}},
        {"name": "charged_cache", "use": CACHE, "llms": ["anthropic"], "config": {"charge_hits": True}},
    ]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    openai_url, anthropic_url = "/llm/openai/v1/chat/completions", "/llm/anthropic/v1/messages"
    async with running_tap(document) as tap:
        before = await upstream_requests(mock_llm)
        miss = await post(tap.url + openai_url, chat("cache me"))
        # Same body with other key order and whitespace: the same entry.
        hit = await post(tap.url + openai_url, {"max_tokens": 3, "messages": [{"content": "cache me", "role": "user"}],
                                                "model": "gpt-4o-mini"})
        assert (miss[0], hit[0]) == (200, 200)
        assert miss[1]["x-cache"] == "miss" and hit[1]["x-cache"] == "hit"
        assert hit[2] == miss[2] and hit[1]["content-type"].startswith("application/json")
        assert await upstream_requests(mock_llm) == before + 1
        # A streamed request is an entry of its own (tests/examples/test_cache_streams.py); no-cache is never looked up.
        streamed = [await post(tap.url + openai_url, chat("cache me", stream=True)) for _ in range(2)]
        assert [s[1]["x-cache"] for s in streamed] == ["miss", "hit"]
        bypass = await post(tap.url + openai_url, chat("cache me"), {"cache-control": "no-cache"})
        assert bypass[1]["x-cache"] == "miss"
        assert await upstream_requests(mock_llm) == before + 3
        charged = [await post(tap.url + anthropic_url, chat("charge me")) for _ in range(2)]
        assert [c[1]["x-cache"] for c in charged] == ["miss", "hit"]
        async with aiohttp.ClientSession() as http, http.get(f"{tap.url}/plugins/cache/stats",
                                                              headers={"x-api-key": APP_KEY}) as resp:
            stats = await resp.json()
        assert stats["hits"] == 2 and stats["stores"] >= 2

    ids = {name: r[1]["x-request-id"] for name, r in (("miss", miss), ("hit", hit), ("charged_miss", charged[0]),
                                                       ("charged_hit", charged[1]))}
    # Three events per request, except two for the uncharged hits (no budget_usage).
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 + 2 + 3 + 2 + 3 + 3 + 3))
    miss_a, hit_a = events[ids["miss"]]["analytics"], events[ids["hit"]]["analytics"]
    assert isinstance(miss_a, Analytics) and isinstance(hit_a, Analytics)
    assert not miss_a.cache_hit and hit_a.cache_hit
    assert hit_a.upstream_ms == 0 and miss_a.upstream_ms is not None and miss_a.upstream_ms > 0
    assert (hit_a.prompt_tokens, hit_a.completion_tokens) == (miss_a.prompt_tokens, miss_a.completion_tokens) != (0, 0)
    assert hit_a.cost == 0 and miss_a.cost > 0
    hit_log = events[ids["hit"]]["proxy_log"]
    assert isinstance(hit_log, ProxyLog) and hit_log.status_code == 200 and hit_log.latency.upstream_ms == 0
    assert hit_log.response_headers["x-cache"] == "hit"
    assert "budget_usage" in events[ids["miss"]] and "budget_usage" not in events[ids["hit"]]
    charged_hit = events[ids["charged_hit"]]
    assert isinstance(charged_hit["analytics"], Analytics) and charged_hit["analytics"].cache_hit
    budget = charged_hit["budget_usage"]
    assert isinstance(budget, BudgetUsage) and budget.cost > 0
    assert budget.cost == events[ids["charged_miss"]]["budget_usage"].cost  # type: ignore[attr-defined]


async def test_entries_expire_after_their_ttl(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                              tmp_path: Path) -> None:
    plugins = [{"name": "cache", "use": CACHE, "kv": {"backend": "shared"}, "config": {"ttl_s": 0.3}}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    async with running_tap(document) as tap:
        url = tap.url + "/llm/openai/v1/chat/completions"
        before = await upstream_requests(mock_llm)
        assert (await post(url, chat("short lived")))[1]["x-cache"] == "miss"
        await asyncio.sleep(0.5)  # past the TTL: whatever the timing, the entry is stale now
        assert (await post(url, chat("short lived")))[1]["x-cache"] == "miss"
        assert await upstream_requests(mock_llm) == before + 2


async def test_two_workers_share_the_cache_and_its_size_bound(mock_llm: str, kafka_bootstrap: str,
                                                              topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    plugins = [{"name": "pid", "use": "tests.examples.test_response_cache:WorkerPid", "order": 0},
               # ~1.5 responses of the mock fit: each new entry evicts the oldest one. No in-process copies, which
               # would still serve an entry the store evicted: this test is about the store.
               {"name": "cache", "use": CACHE, "order": 1, "kv": {"backend": "shared", "max_bytes": 900},
                "config": {"local_max_entries": 0}}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", plugins=plugins, port=port,
                          tap={"workers": 2, "access_log": False})
    config = tmp_path / "tap.yaml"
    config.write_text(yaml.safe_dump(document))
    tap = ManagedProcess("tap-cache", cli_argv("serve", "--config", str(config)), cwd=ROOT,
                         ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"), log_path=tmp_path / "tap.log",
                         stop_signal=15, stop_timeout=30).start()
    url = f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions"
    try:
        before = await upstream_requests(mock_llm)
        status, headers, first = await post(url, chat("shared between workers"))
        assert status == 200 and headers["x-cache"] == "miss"
        # The store is written in the background, just after the answer went out: wait until it holds the entry.
        for _ in range(100):
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/plugins/cache/stats",
                                                                  headers={"x-api-key": APP_KEY}) as resp:
                if (await resp.json())["entries"] == 1:
                    break
            await asyncio.sleep(0.05)
        first_pid, seen = headers["x-worker-pid"], {}
        for _ in range(200):  # until the other worker answered (the kernel spreads new connections)
            status, headers, body = await post(url, chat("shared between workers"))
            seen[headers["x-worker-pid"]] = headers["x-cache"]
            if len(seen) == 2 and first_pid in seen:
                break
        assert len(seen) == 2, f"only worker {seen} answered"
        assert set(seen.values()) == {"hit"} and body == first
        assert await upstream_requests(mock_llm) == before + 1
        # Size bound: a second and a third entry push the first out; the newest stays.
        for text in ("second", "third"):
            assert (await post(url, chat(text)))[1]["x-cache"] == "miss"
        for _ in range(100):  # until the background write of "third" landed (a miss stores it again, harmless)
            if (await post(url, chat("third")))[1]["x-cache"] == "hit":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the newest entry never became a hit")
        assert (await post(url, chat("shared between workers")))[1]["x-cache"] == "miss"
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/plugins/cache/stats",
                                                              headers={"x-api-key": APP_KEY}) as resp:
            stats = await resp.json()
        assert stats["bytes"] <= 900
        for _ in range(50):  # counted by both workers in one store, each adding its counts every second
            if stats["hits"] >= 2:
                break
            await asyncio.sleep(0.1)
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/plugins/cache/stats",
                                                                  headers={"x-api-key": APP_KEY}) as resp:
                stats = await resp.json()
        assert stats["hits"] >= 2
    finally:
        tap.stop()
