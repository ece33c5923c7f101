"""Issue 21 item 3: an upstream answer is capped after decompression (``llms[].limits``).

Against the real tap with an upstream of the tests' own that sends too much: a body larger than
``max_response_bytes`` (declared or not), an endless body, gzip and deflate bombs, an endless or gzip-compressed
endless stream, one endless event. Nothing sent yet: 502 ``upstream_response_too_large``; a stream already
started: it ends. Either way the answer is recorded, the tap hangs up on the upstream at the cap (not at
``total_s``), and a normal answer still passes. The worker's memory while this happens is measured by
``bench/upstream_rss.py`` (``test_worker_rss_stays_bounded`` below runs its short form).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.hostile_upstream import HostileUpstream, RawResponse, raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

MIB = 1024 * 1024
SMALL = {"max_response_bytes": 1 * MIB, "max_stream_bytes": 2 * MIB, "max_event_bytes": 256 * 1024}
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
PREFIX = "sec-limits"


@pytest.fixture(scope="module")
async def tap(upstream: HostileUpstream, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    spool: Path = tmp_path_factory.mktemp("upstream-limits")
    # Timeouts far beyond the test's own: an answer held until total_s would fail the test, not pass late.
    slow = {"first_byte_s": 600, "total_s": 600}
    document = tap_config(upstream.url, kafka_bootstrap, PREFIX, spool, extra_llms=[
        {"id": "small", "vendor": "openai", "upstream_url": upstream.url, "limits": SMALL, "timeouts": slow}])
    document["llms"][0]["timeouts"] = slow
    async with running_tap(document) as running:
        yield running


async def _call(tap: RunningTap, llm: str, hostile: str, *, stream: bool = False) -> RawResponse:
    body = CHAT[:-1] + b',"stream":true}' if stream else CHAT
    return await raw_request(tap.url, f"/llm/{llm}/v1/chat/completions", method="POST", timeout_s=60, body=body,
                             headers={"Authorization": f"Bearer {APP_KEY}", "content-type": "application/json",
                                      "x-hostile": hostile})


@pytest.mark.parametrize(("llm", "hostile", "limit"), [
    ("openai", f"big:{40 * MIB}", 32 * MIB),  # declared by Content-Length: refused unread
    ("openai", "endless", 32 * MIB),  # chunked, never ends
    ("openai", f"gzip-bomb:{400 * MIB}", 32 * MIB),  # the issue's ~400 KB gzip inflating to 400 MB
    ("openai", f"deflate-bomb:{400 * MIB}", 32 * MIB),
    ("openai", "gzip-endless", 32 * MIB),
    ("small", f"big:{2 * MIB}", 1 * MIB),
    ("small", f"gzip-bomb:{64 * MIB}", 1 * MIB),
])
async def test_a_whole_answer_over_the_cap_is_a_recorded_502(tap: RunningTap, upstream: HostileUpstream,
                                                              kafka_bootstrap: str, llm: str, hostile: str,
                                                              limit: int) -> None:
    resp = await _call(tap, llm, hostile)
    assert resp.status == 502, (hostile, resp.body[:300])
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_response_too_large")
    assert f"larger than {limit} bytes (llms[{llm}].limits.max_response_bytes)" in error["message"]
    await upstream.idle()
    rid = resp.headers["x-request-id"]
    log = (await events_for(kafka_bootstrap, PREFIX, [rid]))[rid]
    assert (log.status_code, log.error.code) == (502, "upstream_response_too_large")


@pytest.mark.parametrize(("hostile", "key"), [
    ("endless-sse", "max_stream_bytes"),
    ("gzip-endless-sse", "max_stream_bytes"),
    ("endless-event", "max_event_bytes"),
])
async def test_a_stream_over_the_cap_ends_and_is_recorded(tap: RunningTap, upstream: HostileUpstream,
                                                          kafka_bootstrap: str, hostile: str, key: str) -> None:
    resp = await _call(tap, "small", hostile, stream=True)
    assert resp.status == 200  # the status line was out before the cap was reached
    assert len(resp.body) <= SMALL["max_stream_bytes"]
    await upstream.idle()
    rid = resp.headers["x-request-id"]
    log = (await events_for(kafka_bootstrap, PREFIX, [rid]))[rid]
    assert (log.status_code, log.error.code) == (200, "upstream_response_too_large")
    assert f"(llms[small].limits.{key})" in log.error.message
    assert log.response_bytes == len(resp.body) <= SMALL["max_stream_bytes"]


async def test_answers_within_the_caps_pass(tap: RunningTap) -> None:
    whole = await _call(tap, "small", f"big:{MIB - 100}")
    assert (whole.status, len(whole.body)) == (200, MIB - 100)
    bomb = await _call(tap, "small", f"gzip-bomb:{MIB // 2}")  # compressed, inflating to under the cap
    assert (bomb.status, len(bomb.body)) == (200, MIB // 2)
    streamed = await _call(tap, "small", "usage-sse:" + '{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}',
                           stream=True)
    assert streamed.status == 200 and b"[DONE]" in streamed.body


async def test_a_body_in_an_encoding_the_tap_cannot_decode_is_a_recorded_502(tap: RunningTap,
                                                                             kafka_bootstrap: str) -> None:
    resp = await _call(tap, "small", "br")  # Brotli is not installed: not advertised, and not decoded
    assert resp.status == 502
    rid = resp.headers["x-request-id"]
    log = (await events_for(kafka_bootstrap, PREFIX, [rid]))[rid]
    assert log.status_code == 502




RSS_GROWTH_BOUND_MIB = 192


@pytest.mark.timeout(600)
async def test_worker_rss_stays_bounded(kafka_bootstrap: str, tmp_path: Path) -> None:
    """``gateway-tap serve`` with the default limits, two hostile answers at once per scenario: a gzip bomb
    (400 MiB of zeros; 845 MiB of growth on the previous main), an endless body (past 2 GiB, killed, on the
    previous main) and an endless gzip-compressed stream."""
    from bench.upstream_rss import SCENARIOS, measure

    chosen = [s for s in SCENARIOS if s[0] in ("gzip bomb 400 MiB", "endless body", "endless gzip stream")]
    outcomes = await measure(kafka_bootstrap, tmp_path, 2, scenarios=chosen, timeout_s=120.0, kill_mib=2048.0)
    table = "\n".join(o.line() for o in outcomes)
    assert [o.name for o in outcomes] == [s[0] for s in chosen], table
    for outcome in outcomes:
        assert not outcome.killed and outcome.peak_mib - outcome.base_mib < RSS_GROWTH_BOUND_MIB, table
        statuses = {a[0] for a in outcome.answers}
        assert statuses == ({200} if "stream" in outcome.name else {502}), table
    print(table)
