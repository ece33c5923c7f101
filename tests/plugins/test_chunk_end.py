"""The end of a body for chunk hooks (``on_response_end``): a chunk hook may hold bytes back (text cut across two
chunks) and send them when the body ends; what it sends passes through the chunk hooks after it. The same engine in
the tap (official ``openai`` SDK, whole and streamed, events split mid-way by the mock) and in ``PluginHarness``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import openai

from gateway_tap.hooks import HookContext, HookResult, StreamEvent
from gateway_tap.plugins.loader import validate_plugin_configs
from gateway_tap.plugins.testing import PluginHarness
from gateway_tap.settings import PluginConfig
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
PATTERN = b"secret"
REPLY = {"x-mock-reply": "my secret plan", "x-mock-split-events": "1"}
MESSAGES: Any = [{"role": "user", "content": "tell me"}]


class Redactor:
    """Replaces ``secret`` in the raw bytes, also when a chunk boundary cuts it: keeps the last
    ``len(PATTERN) - 1`` bytes of each chunk back and sends them with the next chunk, or at the end."""

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        data = (ctx.state.pop("held", b"") + chunk).replace(PATTERN, b"[redacted]")
        keep = len(PATTERN) - 1
        ctx.state["held"] = data[-keep:]
        return data[:-keep]

    async def on_response_end(self, ctx: HookContext) -> bytes:
        return ctx.state.pop("held", b"")


class Counter:
    """A chunk hook after the redactor: counts every byte it passes on, per request."""

    seen: ClassVar[dict[str, int]] = {}

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        Counter.seen[ctx.request_id] = Counter.seen.get(ctx.request_id, 0) + len(chunk)
        return chunk


class EndWithoutChunks:
    async def on_response_end(self, ctx: HookContext) -> bytes:
        return b""


class StopOnPlan:
    """Ends the stream at the event carrying ``plan``."""

    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        return HookResult.stop(403, "no plans", code="content_blocked") if "plan" in event.data else None


def _plugin(name: str, cls: type, order: int) -> dict[str, Any]:
    return {"name": name, "use": f"{__name__}:{cls.__name__}", "order": order}


async def test_held_back_bytes_are_sent_at_the_end_in_the_tap(mock_llm: str, kafka_bootstrap: str,
                                                              topic_prefix: str, tmp_path: Path) -> None:
    Counter.seen.clear()
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                          plugins=[_plugin("redactor", Redactor, 1), _plugin("counter", Counter, 2)])
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers=REPLY)
        # Whole: the body's last bytes were held back by the chunk call and come with the end.
        whole = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,
                                                                       max_tokens=3)
        assert whole.parse().choices[0].message.content == "my [redacted] plan"
        assert Counter.seen[whole.headers["x-request-id"]] == len(whole.http_response.content)

        # Streamed, each event written in two halves: "secret" is cut by chunk boundaries, and the stream's
        # last bytes ("[DONE]\n\n") are held back until the end.
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=6,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "my [redacted] plan my [redacted] plan "
        async with aiohttp.ClientSession() as http, http.post(
                f"{tap.url}/llm/openai/v1/chat/completions", headers={"authorization": f"Bearer {APP_KEY}", **REPLY},
                json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 6, "stream": True}) as resp:
            raw = await resp.read()
            request_id = resp.headers["x-request-id"]
    assert b"secret" not in raw and raw.count(b"[redacted]") == 2
    assert raw.endswith(b"data: [DONE]\n\n")
    assert Counter.seen[request_id] == len(raw)  # what the redactor sent at the end went through the counter


async def test_the_end_follows_a_stop_in_the_tap(mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
                                                tmp_path: Path) -> None:
    """A stream ended by a hook: the final error event went through the redactor, which held its last bytes back;
    the end sends them, so the client gets the whole error event (the SDK raises it)."""
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path,
                          plugins=[_plugin("stop", StopOnPlan, 1), _plugin("redactor", Redactor, 2)])
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers=REPLY)
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, max_tokens=6,
                                                      stream=True)
        text = []
        try:
            async for c in stream:
                text += [c.choices[0].delta.content or ""] if c.choices else []
            raise AssertionError("the stream was not ended by the hook")
        except openai.APIError as exc:
            assert "no plans" in exc.message
        assert "".join(text) == "my [redacted] "


async def test_the_harness_gives_chunk_hooks_the_same_end() -> None:
    async with PluginHarness(Redactor) as h:
        got = await h.response(chunks=[b'data: {"t": "my sec', b'ret plan"}\n\n', b"data: [DONE]\n\n"])
        whole = await h.response(headers={"content-type": "application/json"}, body=b'{"t": "a secret"}')
    assert got.body == b'data: {"t": "my [redacted] plan"}\n\ndata: [DONE]\n\n'
    assert whole.body == b'{"t": "a [redacted]"}'


class RedactingStopper(Redactor, StopOnPlan):
    pass


async def test_the_end_follows_a_stop_in_the_harness() -> None:
    async with PluginHarness(RedactingStopper, name="guard") as h:
        got = await h.response(chunks=[b'data: {"t": "a secret"}\n\n', b'data: {"t": "the plan"}\n\n',
                                       b'data: {"t": "never sent"}\n\n'])
    assert got.stopped_by == "guard"
    events = got.events()
    assert events[0].json() == {"t": "a [redacted]"} and "no plans" in events[-1].data
    assert got.body.endswith(b"\n\n") and b"never sent" not in got.body


def test_an_end_hook_needs_a_chunk_hook() -> None:
    problems = validate_plugin_configs([PluginConfig(name="e", use=f"{__name__}:EndWithoutChunks")])
    assert problems == ["plugins[0] (e).on_response_end: without on_response_chunk there is nothing it could have "
                        "held back; expected async def on_response_chunk(self, chunk, ctx) beside it"]
