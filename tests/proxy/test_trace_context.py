"""W3C trace context: the tap continues the caller's trace (or starts one), forwards and returns its span, shows
the trace to hooks and records it in every event."""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp
import openai
import pytest

from gateway_tap.hooks import HookContext, TapRequest
from gateway_tap.tracing import continue_trace, start_trace
from schemas import ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, read_events, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
MESSAGES = [{"role": "user", "content": "hi"}]


# -- parsing, as the W3C recommendation says ---------------------------------------------------------------------

def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    trace = continue_trace(CALLER)
    assert (trace.trace_id, trace.parent_span_id, trace.flags) == (CALLER_TRACE, CALLER_SPAN, "01")
    assert re.fullmatch("[0-9a-f]{16}", trace.span_id) and trace.span_id != CALLER_SPAN
    assert trace.traceparent == f"00-{CALLER_TRACE}-{trace.span_id}-01"
    # A later version is read as 00 (its extra fields ignored); flags are kept.
    later = continue_trace(f"cc-{CALLER_TRACE}-{CALLER_SPAN}-00-what-comes-next")
    assert (later.trace_id, later.parent_span_id, later.flags) == (CALLER_TRACE, CALLER_SPAN, "00")


@pytest.mark.parametrize("value", [
    None, "", "garbage", f"00-{CALLER_TRACE}-{CALLER_SPAN}",  # incomplete
    f"00-{'0' * 32}-{CALLER_SPAN}-01", f"00-{CALLER_TRACE}-{'0' * 16}-01",  # all-zero ids
    f"ff-{CALLER_TRACE}-{CALLER_SPAN}-01",  # the forbidden version
    f"00-{CALLER_TRACE.upper()}-{CALLER_SPAN}-01",  # upper case is not valid
    f"00-{CALLER_TRACE}-{CALLER_SPAN}-01-extra",  # version 00 has exactly four fields
])
def test_anything_else_starts_a_trace(value: str | None) -> None:
    trace = continue_trace(value)
    assert trace.trace_id != CALLER_TRACE and trace.parent_span_id is None and trace.flags == "01"
    assert TRACEPARENT.fullmatch(trace.traceparent)
    assert start_trace().trace_id != start_trace().trace_id


# -- through the real tap -----------------------------------------------------------------------------------------

class TraceTagger:
    """Puts what a hook sees of the trace into the request's metadata."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> None:
        ctx.metadata["seen_trace_id"] = ctx.trace_id
        ctx.metadata["seen_traceparent"] = ctx.traceparent


async def test_the_callers_trace_goes_upstream_back_to_the_client_to_hooks_and_into_every_event(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    plugins = [{"name": "tagger", "use": "tests.proxy.test_trace_context:TraceTagger"}]
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, plugins=plugins)
    async with running_tap(document) as tap:
        client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                    default_headers={"traceparent": CALLER, "tracestate": "vendor=abc"})
        raw = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES,  # type: ignore[arg-type]
                                                                     max_tokens=2)
        returned = TRACEPARENT.fullmatch(raw.headers["traceparent"])
        request_id = raw.headers["x-request-id"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{mock_llm}/_mock/stats") as resp:
                upstream = (await resp.json())["last_headers"]
            async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json={"model": "m"},
                                 headers={"traceparent": CALLER}) as resp:  # no key: rejected, still traced
                assert resp.status == 401
                rejected = TRACEPARENT.fullmatch(resp.headers["traceparent"])
                rejected_id = resp.headers["x-request-id"]
    assert returned is not None and returned.group(1) == CALLER_TRACE
    tap_span = returned.group(2)
    assert tap_span != CALLER_SPAN
    assert upstream["traceparent"] == f"00-{CALLER_TRACE}-{tap_span}-01"  # the upstream is a child of the tap
    assert upstream["tracestate"] == "vendor=abc"
    assert rejected is not None and rejected.group(1) == CALLER_TRACE and rejected.group(2) != tap_span

    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 + 2))
    for event in events[request_id].values():
        assert (event.trace_id, event.span_id, event.parent_span_id) == (CALLER_TRACE, tap_span, CALLER_SPAN)
    log = events[request_id]["proxy_log"]
    assert isinstance(log, ProxyLog)
    assert log.metadata["seen_trace_id"] == CALLER_TRACE
    assert log.metadata["seen_traceparent"] == f"00-{CALLER_TRACE}-{tap_span}-01"
    assert events[rejected_id]["proxy_log"].trace_id == CALLER_TRACE


async def test_without_a_traceparent_the_tap_starts_the_trace(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path)
    async with running_tap(document) as tap, aiohttp.ClientSession() as http:
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions",
                             json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 2},
                             headers={"authorization": f"Bearer {APP_KEY}",
                                      "traceparent": f"00-{'0' * 32}-{CALLER_SPAN}-01"}) as resp:  # not valid
            assert resp.status == 200
            returned = TRACEPARENT.fullmatch(resp.headers["traceparent"])
            request_id = resp.headers["x-request-id"]
    assert returned is not None and returned.group(1) != "0" * 32
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))[request_id]
    for event in events.values():
        assert (event.trace_id, event.span_id, event.parent_span_id) == (returned.group(1), returned.group(2), None)
