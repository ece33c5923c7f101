"""What the tap forwards upstream and back: hop-by-hop headers and the client's credentials never pass."""

from __future__ import annotations

import os

from multidict import CIMultiDict

from gateway_tap.hooks import TapRequest
from gateway_tap.plugins.chain import Chain, RequestScope
from gateway_tap.proxy.handler import ProxyHandler, _without
from gateway_tap.proxy.upstream import RESPONSE_HEADERS_DROPPED, Upstream
from gateway_tap.settings import LLMConfig
from gateway_tap.tracing import continue_trace


def test_request_headers_lose_hop_by_hop_and_credentials_whatever_their_case() -> None:
    os.environ["UPSTREAM_HEADERS_TEST_KEY"] = "sk-upstream"
    up = Upstream.build(LLMConfig(id="o", vendor="openai", upstream_url="http://127.0.0.1:1/",
                                  api_key_env="UPSTREAM_HEADERS_TEST_KEY"), Chain())
    headers = CIMultiDict([("Host", "tap:8080"), ("AUTHORIZATION", "Bearer gt-client"), ("X-Api-Key", "gt-client"),
                           ("Connection", "keep-alive"), ("Transfer-Encoding", "chunked"), ("Accept-Encoding", "br"),
                           ("Content-Length", "12"), ("X-Custom", "a"), ("X-Custom", "b"), ("Content-Type", "json")])
    req = TapRequest("POST", "v1/chat/completions", "", headers, b"{}")
    scope = RequestScope("req_1", "o", trace=continue_trace("00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
    sent = ProxyHandler._upstream_headers(up, req, scope)
    assert sorted(sent.items()) == sorted([("X-Custom", "a"), ("X-Custom", "b"), ("Content-Type", "json"),
                                           ("Authorization", "Bearer sk-upstream"), ("x-request-id", "req_1"),
                                           ("traceparent", scope.trace.traceparent)])
    assert scope.trace.traceparent.startswith("00-" + "a" * 32 + "-") and "b" * 16 not in scope.trace.traceparent


def test_response_headers_lose_framing_and_hop_by_hop() -> None:
    got = _without(CIMultiDict([("Content-Encoding", "gzip"), ("content-length", "10"), ("Keep-Alive", "5"),
                                ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Request-Id", "up")]),
                   RESPONSE_HEADERS_DROPPED)
    assert list(got.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("X-Request-Id", "up")]
