"""The response cache on streams, through the real tap with the official SDKs: a stream is stored once it ended,
replayed as a stream on a hit (HookResult.respond with text/event-stream) through the stream event hooks and the
tap's accounting (the original's exact usage, the usage chunk withheld from clients that did not ask for it), and
Cache-Control: no-store (request or answer) is respected."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai

from gateway_tap.hooks import HookContext, HookResult, StreamEvent, TapResponse
from schemas import Analytics
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
CACHE = {"name": "cache", "use": "gateway_tap.examples.plugins.response_cache:ResponseCache", "order": 10}
MESSAGES: Any = [{"role": "user", "content": "stream me a cached answer"}]


class EventCounter:
    """After the cache: counts the events it sees, so a replayed stream visibly goes through event hooks."""

    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        ctx.metadata["events_seen"] = str(int(ctx.metadata.get("events_seen", "0")) + 1)
        return None


class NoStore:
    """Before the cache: the answer says `cache-control: no-store`, as an upstream may."""

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> HookResult | None:
        if ctx.model == "gpt-4o-no-store":
            response.headers["cache-control"] = "no-store"
        return None


PLUGINS = [CACHE, {"name": "counter", "use": "tests.examples.test_cache_streams:EventCounter", "order": 20},
           {"name": "no_store", "use": "tests.examples.test_cache_streams:NoStore", "order": 0}]


async def upstream_requests(mock_llm: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{mock_llm}/_mock/stats") as resp:
        return int((await resp.json())["requests"])


async def _openai_stream(client: openai.AsyncOpenAI, **extra: Any) -> tuple[str, list[Any], Any]:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                 max_tokens=5, stream=True, **extra)
    chunks = [chunk async for chunk in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks, raw.headers


async def test_openai_stream_is_replayed_as_a_stream_with_the_original_usage(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=PLUGINS)
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers={"x-mock-reply": "alpha beta gamma"})
        before = await upstream_requests(mock_llm)
        miss_text, miss_chunks, miss_headers = await _openai_stream(client)
        hit_text, hit_chunks, hit_headers = await _openai_stream(client)
        assert (miss_headers["x-cache"], hit_headers["x-cache"]) == ("miss", "hit")
        assert hit_headers["content-type"].startswith("text/event-stream")
        assert hit_text == miss_text == "alpha beta gamma alpha beta "
        # The client did not ask for usage: neither the miss nor the replay shows it the usage chunk.
        assert all(c.choices for c in miss_chunks + hit_chunks)
        assert await upstream_requests(mock_llm) == before + 1
        # A client that asks for usage is another entry, and gets the usage chunk, replayed too.
        asked = [await _openai_stream(client, stream_options={"include_usage": True}) for _ in range(2)]
        assert [a[2]["x-cache"] for a in asked] == ["miss", "hit"]
        for _, chunks, _ in asked:
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 5
        assert await upstream_requests(mock_llm) == before + 2
    ids = {"miss": miss_headers["x-request-id"], "hit": hit_headers["x-request-id"]}
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 + 2 + 3 + 2))
    miss, hit = events[ids["miss"]]["analytics"], events[ids["hit"]]["analytics"]
    assert isinstance(miss, Analytics) and isinstance(hit, Analytics)
    assert hit.cache_hit and hit.streamed and not miss.cache_hit
    # The replay is accounted from the stored usage report: exact, equal to the original's.
    assert not hit.tokens_estimated and not miss.tokens_estimated
    assert (hit.prompt_tokens, hit.completion_tokens) == (miss.prompt_tokens, miss.completion_tokens) == (6, 5)
    assert hit.cost == 0 and hit.upstream_ms == 0
    # The event hook after the cache saw the replayed events as it saw the upstream's.
    assert hit.tags["events_seen"] == miss.tags["events_seen"]


async def test_anthropic_stream_hit_reads_like_the_upstream_stream(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=PLUGINS)
    async with running_tap(document) as tap:
        client = anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=APP_KEY, max_retries=0)
        before = await upstream_requests(mock_llm)
        texts, finals = [], []
        for _ in range(2):
            async with client.messages.stream(model="claude-haiku-4-5", max_tokens=4, messages=MESSAGES) as stream:
                texts.append("".join([text async for text in stream.text_stream]))
                finals.append(await stream.get_final_message())
        assert texts[0] == texts[1] == "tok tok tok tok "
        assert finals[1].usage.output_tokens == finals[0].usage.output_tokens == 4
        assert await upstream_requests(mock_llm) == before + 1


async def test_no_store_and_unfinished_streams_are_not_stored(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    guard = {"name": "guard", "use": "gateway_tap.examples.plugins.output_guard:OutputGuard", "order": 30,
             "config": {"patterns": ["forbidden"]}}
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[*PLUGINS, guard])
    url_path = "/llm/openai/v1/chat/completions"
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        async def post(body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
            async with http.post(tap.url + url_path, json=body, headers={
                    "authorization": f"Bearer {APP_KEY}", **(headers or {})}) as resp:
                await resp.read()
                return resp.headers["x-cache"]

        chat = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3}
        before = await upstream_requests(mock_llm)
        for stream in (False, True):
            body = {**chat, "stream": stream}
            # The request's no-store: nothing stored (a stored entry would still be served).
            assert [await post(body, {"cache-control": "no-store"}) for _ in range(2)] == ["miss", "miss"]
            # The answer's no-store.
            no_store = {**body, "model": "gpt-4o-no-store"}
            assert [await post(no_store) for _ in range(2)] == ["miss", "miss"]
        # A stream the guard (after the cache) ends early never completes: not stored.
        cut = {**chat, "stream": True, "max_tokens": 6}
        assert [await post(cut, {"x-mock-reply": "a b forbidden c"}) for _ in range(2)] == ["miss", "miss"]
        assert await upstream_requests(mock_llm) == before + 10
        # The same requests without no-store are cached.
        assert [await post({**chat, "stream": True}) for _ in range(2)] == ["miss", "hit"]


async def test_a_streamed_answer_of_a_plugin_in_the_harness() -> None:
    from gateway_tap.plugins.testing import PluginHarness

    stream = (b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
              b"data: [DONE]\n\n")
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    async with PluginHarness("gateway_tap.examples.plugins.response_cache:ResponseCache") as h:
        miss = await h.request(json=body)
        assert miss.served is None and miss.request.json()["stream_options"] == {"include_usage": True}
        sent = await h.response(miss, headers={"content-type": "text/event-stream"}, chunks=[stream])
        assert b'"usage"' not in sent.body  # the usage report asked for by the cache is withheld from this client
        hit = await h.request(json=body)
        assert hit.served is not None and hit.served.cache_hit
        replayed = await h.response(hit)  # the plugin's own answer, streamed as in the tap
    assert replayed.headers["x-cache"] == "hit" and [e.data for e in replayed.events()][-1] == "[DONE]"
    assert b'"usage"' in hit.served.body  # stored with the usage report; the tap withholds it on replay
