"""Issue 21 item 2: a request is recorded whatever bytes its headers, user agent or path hold.

One byte that is not UTF-8 in a header (``X-Foo: \\xff``) used to make the proxy_log fail to encode ("surrogates
not allowed") and vanish, while the request was served. Against the real tap (events to Kafka) with an upstream
of the tests' own: every such request, with a key or without, gets its answer and exactly its proxy_log, the
undecodable bytes escaped (``\\xff``). Below the tap, the same guarantee for any event and any log line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import orjson
import pytest

from gateway_tap.proxy.exchange import Exchange
from gateway_tap.proxy.logs import JsonFormatter
from schemas import MAX_EVENT_BYTES, ProxyLog, decode_event
from schemas.wire import encode_wire
from tests.support.hostile_upstream import HostileUpstream, RawResponse, raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

PREFIX = "sec-bytes"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture(scope="module")
async def tap(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    spool: Path = tmp_path_factory.mktemp("proxy-log-bytes")
    async with HostileUpstream() as upstream, running_tap(tap_config(upstream.url, kafka_bootstrap, PREFIX,
                                                                      spool)) as running:
        yield running


async def _post(tap: RunningTap, headers: dict[str, str], target: str = "/llm/openai/v1/chat/completions"
                ) -> RawResponse:
    # raw_request writes the headers as latin-1: "\xff" goes out as the single byte 0xff, as an attacker sends it.
    return await raw_request(tap.url, target, method="POST", body=CHAT,
                             headers={"content-type": "application/json", **headers})


async def test_undecodable_header_bytes_never_make_a_request_vanish(tap: RunningTap, kafka_bootstrap: str) -> None:
    sent = {
        "served": await _post(tap, {"authorization": f"Bearer {APP_KEY}", "x-foo": "\xff",
                                    "user-agent": "agent/1.0 \xfe\xff"}),
        "no key": await _post(tap, {"x-foo": "a\xffb", "user-agent": "\xc3\x28"}),
        "bad key": await _post(tap, {"authorization": "Bearer \xff\xfe", "x-e": "\xe9t\xe9"}),
        "bad path": await _post(tap, {"authorization": f"Bearer {APP_KEY}"},
                                target="/llm/openai/v1/chat/compl\xffetions"),
        "unknown route": await _post(tap, {"x-foo": "\xff"}, target="/nowhere/\xff"),
    }
    assert sent["served"].status == 200
    assert sent["no key"].status == sent["bad key"].status == 401
    # aiohttp's parser refuses a request target that is not ASCII: a 400 of the parser, recorded like the rest.
    assert sent["bad path"].status in (400, 404) and sent["unknown route"].status in (400, 404)
    ids = {name: resp.headers["x-request-id"] for name, resp in sent.items()}
    logs = await events_for(kafka_bootstrap, PREFIX, list(ids.values()))
    missing = [name for name, rid in ids.items() if rid not in logs]
    assert not missing, f"proxy_logs missing for {missing}"
    served = logs[ids["served"]]
    assert isinstance(served, ProxyLog) and served.status_code == 200
    assert served.request_headers["x-foo"] == "\\xff"  # escaped, so it can be told from the text "\xff"
    assert served.user_agent == "agent/1.0 \\xfe\\xff"
    assert logs[ids["no key"]].user_agent == "\\xc3("  # type: ignore[attr-defined]
    bad_key = logs[ids["bad key"]]  # an undecodable key is an unknown key (main answered it with a 500)
    assert isinstance(bad_key, ProxyLog) and bad_key.error is not None and bad_key.error.code == "invalid_api_key"
    assert bad_key.request_headers["x-e"] == "\\xe9t\\xe9"


def test_any_event_with_text_that_is_not_unicode_encodes() -> None:
    """The net under every field: a lone surrogate anywhere (a plugin's metadata, an auth hook's user id) is
    escaped at encoding; nothing else of the event changes."""
    ex = Exchange("req_1", "POST", "/llm/x/\udcff", "x", 0.0)
    ex.status, ex.app_id, ex.user_id = 200, "app", "user-\udcfe"
    ex.metadata = {"from-header": "v\udcff", "k\ud800": "lone high surrogate"}
    ex.request_headers = {"x-foo": "\udcff"}
    for event in ex.events("tap-1", capture_bodies=True, body_limit=64):
        with pytest.raises(UnicodeEncodeError):
            msgspec.json.encode(event)  # what the publisher did before: the event was dropped
        decoded = decode_event(encode_wire(event))
        assert decoded.user_id == "user-\\xfe"
        if isinstance(decoded, ProxyLog):
            assert decoded.path == "/llm/x/\\xff" and decoded.request_headers == {"x-foo": "\\xff"}
            assert decoded.metadata == {"from-header": "v\\xff", "k\\ud800": "lone high surrogate"}


def test_an_event_too_large_is_clipped_to_fit_not_dropped() -> None:
    ex = Exchange("req_2", "POST", "/llm/x/v1", "x", 0.0)
    ex.status = 200
    ex.request_body = ex.response_body = b"b" * 3_000_000
    [log, analytics] = ex.events("tap-1", capture_bodies=True, body_limit=3_000_000)
    for limit in (MAX_EVENT_BYTES, 64 * 1024, 4096):
        value = encode_wire(log, limit)
        assert len(value) <= limit
        decoded = decode_event(value)
        assert isinstance(decoded, ProxyLog) and decoded.request_id == "req_2"
        assert decoded.request_body is None or decoded.request_body.endswith("...[truncated]")
    assert encode_wire(analytics, 4096) == msgspec.json.encode(analytics)  # small events: untouched


def test_a_log_line_with_undecodable_text_is_written_escaped() -> None:
    record = logging.LogRecord("gateway_tap.access", logging.INFO, __file__, 1, "request", None, None)
    record.path = "/llm/x/\udcff"
    record.model = "m" * 5000
    line = JsonFormatter().format(record)
    data = orjson.loads(line)
    assert data["path"] == "/llm/x/\\xff"
    assert data["model"] == "m" * 2048 + "...[truncated]"
