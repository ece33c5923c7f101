"""Response hooks that decide after seeing the answer: whole bodies (on_response_body) and parsed stream events
(on_stream_event), with the output guard example; in the harness, then through the real tap with the SDKs."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest

from gateway_tap.hooks import HookContext, HookResult, StreamEvent
from gateway_tap.plugins.sse import EventReader
from gateway_tap.plugins.testing import PluginHarness
from schemas import Analytics, BudgetUsage, ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
GUARD_USE = "gateway_tap.examples.plugins.output_guard:OutputGuard"
GUARD = {"name": "output_guard", "use": GUARD_USE, "config": {"patterns": [r"secret\s+plan\s+alpha"]}}
MESSAGES = [{"role": "user", "content": "tell me everything"}]  # 18 characters: 4 prompt tokens at the mock


# -- the SSE reader ---------------------------------------------------------------------------------------------

def test_reader_sees_an_event_cut_anywhere_exactly_once() -> None:
    stream = (b'data: {"a": 1}\n\n: keep-alive\n\nevent: message_delta\ndata: {"b":\ndata: 2}\n\n'
              b"data: [DONE]\r\n\r\n")
    for cut in range(1, len(stream)):
        reader = EventReader()
        items = [*reader.feed(stream[:cut]), *reader.feed(stream[cut:]), *reader.flush()]
        assert b"".join(i if isinstance(i, bytes) else i.encode() for i in items) == stream  # byte for byte
        events = [i for i in items if isinstance(i, StreamEvent)]
        assert [(e.event, e.json()) for e in events] == [(None, {"a": 1}), ("message_delta", {"b": 2}),
                                                         (None, None)]
        assert events[-1].done and items[1] == b": keep-alive\n\n"


def test_unterminated_last_event_comes_out_on_flush_and_changes_reencode() -> None:
    reader = EventReader()
    assert reader.feed(b"data: one\n\ndata: tw") != []
    (last,) = reader.flush()
    assert isinstance(last, StreamEvent) and last.data == "tw" and last.encode() == b"data: tw"
    last.set_json({"x": "y"})
    assert last.encode() == b'data: {"x":"y"}\n\n'
    multi = StreamEvent("l1\nl2", event="e", id="7")
    assert multi.encode() == b"event: e\nid: 7\ndata: l1\ndata: l2\n\n"


# -- in the harness ---------------------------------------------------------------------------------------------

def _chat_chunk(text: str) -> bytes:
    return (b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
            + text.encode() + b'"}}]}\n\n')


async def test_guard_blocks_a_whole_answer_in_the_harness() -> None:
    async with PluginHarness(GUARD_USE, GUARD["config"], name="guard") as h:
        clean = await h.response(headers={"content-type": "application/json"},
                                 body=b'{"choices":[{"message":{"content":"nothing to see"}}]}')
        blocked = await h.response(headers={"content-type": "application/json"},
                                   body=b'{"choices":[{"message":{"content":"the SECRET  plan alpha is"}}]}')
        anthropic_blocked = await h.response(headers={"content-type": "application/json"},
                                             body=b'{"content":[{"type":"text","text":"secret plan alpha"}]}')
    assert clean.stopped is None and clean.status == 200
    assert blocked.stopped is not None and blocked.stopped_by == "guard"
    assert (blocked.stopped.status, blocked.stopped.code) == (403, "content_blocked")
    assert anthropic_blocked.stopped is not None


async def test_guard_finds_a_match_spread_over_events_and_chunks_in_the_harness() -> None:
    stream = b"".join(_chat_chunk(w) for w in ("the ", "secret ", "plan ", "alpha ", "is ", "here")) + \
        b"data: [DONE]\n\n"
    chunks = [stream[i:i + 7] for i in range(0, len(stream), 7)]  # every event cut across chunks
    async with PluginHarness(GUARD_USE, GUARD["config"], name="guard") as h:
        got = await h.response(chunks=chunks)
    assert got.stopped is not None and got.stopped_by == "guard"
    events = got.events()
    texts = [e.json()["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert texts == ["the ", "secret ", "plan "]  # the event completing the match and all after it withheld
    assert events[-1].json() == {"error": {"type": "permission_error", "code": "content_blocked",
                                           "message": "the answer was blocked by the output guard",
                                           "request_id": events[-1].json()["error"]["request_id"]}}


class Redactor:
    """Rewrites 'secret' to '******' in deltas, drops empty deltas and tags the request."""

    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        payload = event.json()
        if not isinstance(payload, dict) or not payload.get("choices"):
            return None
        delta = payload["choices"][0].get("delta") or {}
        if delta.get("content") == "":
            return HookResult.drop()
        if "secret" in (delta.get("content") or ""):
            delta["content"] = delta["content"].replace("secret", "******")
            event.set_json(payload)
            ctx.metadata["redacted"] = "yes"
        return None


async def test_event_hooks_rewrite_and_drop_in_the_harness() -> None:
    stream = _chat_chunk("") + _chat_chunk("a secret ") + _chat_chunk("b") + b"data: [DONE]\n\n"
    async with PluginHarness(Redactor, name="redactor") as h:
        sent = await h.request(json={"model": "m", "messages": []})
        got = await h.response(sent, chunks=[stream])
    events = got.events()
    assert [e.json()["choices"][0]["delta"]["content"] for e in events[:-1]] == ["a ****** ", "b"]
    assert events[-1].done and got.stopped is None and sent.metadata == {"redacted": "yes"}
    assert got.body.endswith(_chat_chunk("b") + b"data: [DONE]\n\n")  # untouched events stay byte for byte


# -- through the real tap ---------------------------------------------------------------------------------------

async def test_blocked_whole_answer_is_a_403_billed_for_the_prompt_only(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[GUARD])
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers={"x-mock-reply": "the secret plan alpha"})
        with pytest.raises(openai.PermissionDeniedError) as blocked:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                 max_tokens=8)
        body = blocked.value.body
        assert isinstance(body, dict) and body["code"] == "content_blocked"
        request_id = body["request_id"]
    got = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    log, analytics, usage = got["proxy_log"], got["analytics"], got["budget_usage"]
    assert isinstance(log, ProxyLog) and (log.status_code, log.blocked_by) == (403, "output_guard")
    assert log.error is not None and log.error.code == "content_blocked"
    assert isinstance(analytics, Analytics) and (analytics.prompt_tokens, analytics.completion_tokens) == (4, 0)
    assert isinstance(usage, BudgetUsage) and (usage.prompt_tokens, usage.completion_tokens) == (4, 0)
    assert usage.cost_micros == 1 and usage.cost == 1e-6  # 4 prompt tokens x $0.15/1M = 0.6 micro-USD, half up


async def test_openai_stream_cut_by_the_guard_raises_in_the_sdk_and_bills_what_was_delivered(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[GUARD])
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers={"x-mock-reply": "one two secret plan alpha six seven eight",
                                                     "x-mock-split-events": "1"})
        stream = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=8, stream=True)  # type: ignore[arg-type]
        request_id = stream.headers["x-request-id"]
        received: list[str] = []
        with pytest.raises(openai.APIError) as cut:
            async for chunk in stream.parse():
                if chunk.choices:
                    received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two secret plan "
    assert cut.value.message == "the answer was blocked by the output guard"
    assert isinstance(cut.value.body, dict) and cut.value.body["code"] == "content_blocked"
    got = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    log, analytics = got["proxy_log"], got["analytics"]
    assert isinstance(log, ProxyLog) and (log.status_code, log.blocked_by, log.streamed) == (200, "output_guard", True)
    assert log.error is not None and log.error.code == "content_blocked"
    assert isinstance(analytics, Analytics) and analytics.tokens_estimated
    # 5 events reached the client (role chunk + 4 words); the usage report never came: 5 - 2 completion tokens.
    assert (analytics.prompt_tokens, analytics.completion_tokens) == (4, 3)
    assert analytics.blocked_by == "output_guard"


async def test_anthropic_stream_cut_by_the_guard_raises_in_the_sdk(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=[GUARD])
    async with running_tap(document) as tap:
        client = anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=APP_KEY, max_retries=0,
                                          default_headers={"x-mock-reply": "a secret plan alpha b c"})
        received: list[str] = []
        with pytest.raises(anthropic.APIStatusError) as cut:
            async with client.messages.stream(model="claude-haiku-4-5", max_tokens=6,
                                              messages=MESSAGES) as stream:  # type: ignore[arg-type]
                async for text in stream.text_stream:
                    received.append(text)
    assert "".join(received) == "a secret plan "
    assert isinstance(cut.value.body, dict) and cut.value.body["error"]["code"] == "content_blocked"
    request_id = cut.value.body["error"]["request_id"]
    got = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    analytics = got["analytics"]
    # message_start reported the prompt (4 tokens); the final usage never came: output estimated from what was sent.
    assert isinstance(analytics, Analytics) and analytics.tokens_estimated and analytics.prompt_tokens == 4
    assert analytics.blocked_by == "output_guard"


async def test_rewritten_stream_keeps_exact_usage_and_never_leaks_the_usage_chunk(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    plugins = [{"name": "redactor", "use": "tests.plugins.test_response_hooks:Redactor"}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with running_tap(document) as tap, aiohttp.ClientSession() as http, \
            http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {APP_KEY}", "x-mock-reply": "my secret word",
                               "x-mock-split-events": "1"}) as resp:
        payload = await resp.read()
        request_id = resp.headers["x-request-id"]
    assert b"******" in payload and b"secret" not in payload and b'"usage":{' not in payload
    assert b'"content":""' not in payload  # the role chunk's empty delta was dropped
    got = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    analytics = got["analytics"]
    assert isinstance(analytics, Analytics) and not analytics.tokens_estimated
    assert (analytics.prompt_tokens, analytics.completion_tokens) == (4, 3)
    assert analytics.tags == {"redacted": "yes"}
