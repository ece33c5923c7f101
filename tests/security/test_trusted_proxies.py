"""``tap.trusted_proxies``: behind a load balancer the recorded client is the one ``X-Forwarded-For`` names, and
only when the connection comes from a proxy the operator trusts. Against the real tap and Kafka: the proxy_log's
``client_address`` and what the upstream received (never the forwarding headers).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway_tap.proxy.client_address import ClientAddresses
from gateway_tap.settings import parse_config
from schemas import ProxyLog
from tests.support.hostile_upstream import HostileUpstream, RawResponse, raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}'


def _headers(xff: list[str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict([("X-Forwarded-For", v) for v in xff]))


def _clients(*networks: str) -> ClientAddresses:
    document = {"kafka": {"bootstrap_servers": "x:1"}, "tap": {"trusted_proxies": list(networks)}}
    return ClientAddresses(parse_config(document).tap.trusted_proxies)


def test_the_client_is_the_last_forwarded_address_that_is_not_a_trusted_proxy() -> None:
    clients = _clients("127.0.0.1", "10.0.0.0/8", "fd00::/8")
    assert clients.client_of("127.0.0.1", _headers(["198.51.100.7, 203.0.113.9, 10.1.2.3"])) == "203.0.113.9"
    assert clients.client_of("127.0.0.1", _headers(["198.51.100.7", "203.0.113.9,10.1.2.3"])) == "203.0.113.9"
    assert clients.client_of("127.0.0.1", _headers([])) == "127.0.0.1"
    assert clients.client_of("127.0.0.1", _headers(["10.1.1.1, 10.2.2.2"])) == "10.1.1.1"  # all trusted: leftmost
    assert clients.client_of("127.0.0.1", _headers(["2001:db8::1, fd00::5"])) == "2001:db8::1"
    # Garbage ends the walk at the hop that wrote it: nothing left of it is believed.
    assert clients.client_of("127.0.0.1", _headers(["203.0.113.9, unknown, 10.1.2.3"])) == "10.1.2.3"
    assert clients.client_of("127.0.0.1", _headers(["203.0.113.9, <script>"])) == "127.0.0.1"
    # A peer that is not a trusted proxy is its own client, whatever it claims.
    assert clients.client_of("192.0.2.1", _headers(["203.0.113.9"])) == "192.0.2.1"
    assert clients.client_of(None, _headers(["203.0.113.9"])) is None


def test_a_bad_trusted_proxy_fails_at_start_naming_the_key() -> None:
    with pytest.raises(Exception, match="trusted_proxies"):
        _clients("10.0.0.0/33")


async def _chat(tap: RunningTap, **headers: str) -> RawResponse:
    return await raw_request(tap.url, "/llm/openai/v1/chat/completions", method="POST", body=CHAT,
                             headers={"Authorization": f"Bearer {APP_KEY}", "content-type": "application/json",
                                      **headers})


@pytest.mark.parametrize(("trusted", "expected"), [
    (["127.0.0.1/32", "10.0.0.0/8"], "203.0.113.9"),  # the tests connect from 127.0.0.1: a trusted proxy
    (["10.0.0.0/8"], "127.0.0.1"),  # not trusted: X-Forwarded-For is a claim like any other
    ([], "127.0.0.1"),  # the default
])
async def test_the_recorded_client_follows_trusted_proxies_only(
        upstream: HostileUpstream, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, trusted: list[str],
        expected: str) -> None:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    config = tap_config(upstream.url, kafka_bootstrap, topic_prefix, tmp_path / "spool",
                        tap={"trusted_proxies": trusted})
    async with running_tap(config) as tap:
        resp = await _chat(tap, **{"X-Forwarded-For": "198.51.100.7, 203.0.113.9, 10.1.2.3"})
        assert resp.status == 200
        rid = resp.headers["x-request-id"]
        log = (await events_for(kafka_bootstrap, topic_prefix, [rid]))[rid]
        assert isinstance(log, ProxyLog) and log.client_address == expected
        [got] = upstream.for_request(rid)
        assert "x-forwarded-for" not in {name.lower() for name in got.headers}
