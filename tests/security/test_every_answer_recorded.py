"""Issue 21 items 7 and 9: every answer the tap gives carries a request id and has exactly one proxy_log, whose
status is what the client got.

Unrecorded before: every HTTP-parser rejection (431, 414, 400, though they carried an id), ``/budget``, unknown
routes; paths holding ``%0d%0a``, bare ``/plugins`` and a few other answers aiohttp gives itself (405, 417) were
plain text with no id at all. And a plugin header aiohttp refuses to send (CR/LF) left the client without an
answer while the log said 200. Against the real tap over raw sockets, events through the real publisher and
Kafka; one test follows the 431 and an undecodable header through the collectors into the files and
Elasticsearch.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from elasticsearch import AsyncElasticsearch

from collectors.sinks import es_templates as tpl
from gateway_tap.dev.servers import free_port
from gateway_tap.hooks import HookContext, HookResult, TapRequest, TapResponse
from tests.support.collectors import collect_process, create_topics, wait_for, written
from tests.support.hostile_upstream import HostileUpstream
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, all_proxy_logs, running_tap, tap_config

LIMITS = {"max_header_bytes": 1024, "max_header_count": 20, "max_url_bytes": 2048}


class BadHeaders:
    """Sets a header value aiohttp refuses to send (CR/LF), on the answer or on a stop, as the request asks."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        if request.headers.get("x-case") == "stop":
            return HookResult.stop(403, "blocked", headers={"x-why": "policy\r\nx-injected: 1"})
        return None

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> None:
        if ctx.metadata.get("case") == "answer":
            response.headers["x-served"] = "a\r\nx-injected: 1"

    async def pre_auth(self, request: TapRequest, ctx: HookContext) -> None:
        ctx.metadata["case"] = request.headers.get("x-case", "")


async def exchange(url: str, raw: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """``raw`` on a new connection; the answer read to EOF (every request here closes the connection)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request(target: str, headers: list[tuple[str, str]] | None = None, method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: tap", "Connection: close", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


KEY = [("authorization", f"Bearer {APP_KEY}")]
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
JSON = [("content-type", "application/json")]
ANSWERS: dict[str, tuple[bytes, int, str | None]] = {  # name: (bytes sent, status, error code or None)
    "header too large": (request("/llm/openai/v1/models", [("x-big", "a" * 1100)]), 431,
                         "request_header_too_large"),
    "too many headers": (request("/healthz", [(f"x-h{i}", "1") for i in range(25)]), 431, "too_many_request_headers"),
    "url too long": (request("/llm/openai/v1/models?q=" + "b" * 2100), 414, "url_too_long"),
    "not http": (b"GET / HTTP/1.1\r\nHost: tap\r\nBad Header\r\n\r\n", 400, "bad_http_request"),
    "tls on the http port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, "bad_http_request"),
    "budget without key": (request("/budget"), 401, "missing_api_key"),
    "budget with bad key": (request("/budget", [("x-api-key", "nope")]), 401, "invalid_api_key"),
    "budget": (request("/budget", KEY), 200, None),
    "unknown route": (request("/v1/chat/completions"), 404, "route_not_found"),
    "crlf in the path": (request("/llm/openai/v1%0d%0aX-Injected:%201"), 404, "route_not_found"),
    "crlf at the root": (request("/%0d%0a"), 404, "route_not_found"),
    "bare plugins": (request("/plugins"), 404, "route_not_found"),
    "plugins slash": (request("/plugins/"), 404, "route_not_found"),
    "no such plugin": (request("/plugins/nope/x"), 404, "route_not_found"),
    "post to a probe": (request("/healthz", method="POST"), 404, "route_not_found"),
    "method of a plugin endpoint": (request("/plugins/bad/x", method="DELETE"), 404, "route_not_found"),
    "unknown expectation": (request("/llm/openai/v1/chat/completions", [*KEY, *JSON, ("expect", "teapot")],
                                    "POST", CHAT), 417, "expectation_failed"),
    "unknown llm": (request("/llm/nope/v1/models", KEY), 404, "unknown_llm"),
    "proxied": (request("/llm/openai/v1/chat/completions", [*KEY, *JSON], "POST", CHAT), 200, None),
    "refused header of a plugin": (request("/llm/openai/v1/chat/completions", [*KEY, *JSON, ("x-case", "answer")],
                                           "POST", CHAT), 500, "invalid_response_header"),
    "refused header of a stop": (request("/llm/openai/v1/chat/completions", [*KEY, *JSON, ("x-case", "stop")],
                                         "POST", CHAT), 500, "invalid_response_header"),
}


@pytest.fixture
async def tap(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    async with HostileUpstream() as upstream:
        document = tap_config(upstream.url, kafka_bootstrap, topic_prefix, tmp_path / "spool",
                              tap={"limits": LIMITS}, plugins=[{"name": "bad", "use": f"{__name__}:BadHeaders"}])
        async with running_tap(document) as running:
            yield running


async def test_every_answer_carries_an_id_and_has_exactly_one_proxy_log(
        tap: RunningTap, kafka_bootstrap: str, topic_prefix: str) -> None:
    ids: dict[str, str] = {}
    for name, (raw, status, code) in ANSWERS.items():
        got, headers, body = await exchange(tap.url, raw)
        assert got == status, (name, got, body[:300])
        assert headers.get("content-type", "").startswith("application/json"), (name, headers, body[:300])
        rid = headers.get("x-request-id")
        assert rid and rid.startswith("req_"), (name, headers)
        if code is not None:
            error = orjson.loads(body)["error"]
            assert (error["code"], error["request_id"]) == (code, rid), name
        ids[name] = rid
    # The probes are the one exception: polled every few seconds, neither an id nor a record.
    _, probe_headers, _ = await exchange(tap.url, request("/healthz"))
    assert "x-request-id" not in probe_headers

    logs = await all_proxy_logs(kafka_bootstrap, topic_prefix, count=len(ids))
    per_id = Counter(log.request_id for log in logs)
    missing = [name for name, rid in ids.items() if per_id[rid] == 0]
    assert not missing, f"no proxy_log for {missing}"
    assert all(n == 1 for n in per_id.values()), [rid for rid, n in per_id.items() if n > 1]
    assert set(per_id) == set(ids.values())  # nothing recorded that the client was not answered
    by_id = {log.request_id: log for log in logs}
    for name, (_, status, code) in ANSWERS.items():
        log = by_id[ids[name]]
        assert log.status_code == status, name  # what the client got
        assert (log.error.code if log.error else None) == code, name
    rejected = by_id[ids["header too large"]]
    assert (rejected.method, rejected.path, rejected.llm_id) == ("-", "-", None)  # the parser could not tell them
    assert by_id[ids["budget"]].app_id == "test"
    assert by_id[ids["crlf in the path"]].path == "/llm/openai/v1%0d%0aX-Injected:%201"  # as sent, not decoded


async def test_a_refused_header_on_a_stream_is_answered_and_recorded(
        tap: RunningTap, kafka_bootstrap: str, topic_prefix: str) -> None:
    body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    raw = request("/llm/openai/v1/chat/completions", [*KEY, *JSON, ("x-case", "answer"),
                                                      ("x-hostile", "usage-sse:{\"prompt_tokens\":1}")], "POST", body)
    status, headers, answer = await exchange(tap.url, raw)
    assert status == 500 and orjson.loads(answer)["error"]["code"] == "invalid_response_header"
    [log] = await all_proxy_logs(kafka_bootstrap, topic_prefix, count=1)
    assert (log.request_id, log.status_code) == (headers["x-request-id"], 500)


async def test_the_431_and_an_undecodable_header_reach_the_files_and_elasticsearch(
        kafka_bootstrap: str, es_url: str, topic_prefix: str, tmp_path: Path) -> None:
    """The real pipeline: tap -> publisher -> Kafka -> ``gateway-tap collect file`` and ``elasticsearch``."""
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    await create_topics(kafka_bootstrap, topic_prefix)
    kafka = {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix}
    out = tmp_path / "events"
    file_proc = collect_process("file", "file", {"kafka": kafka, "collectors": {"file": {
        "metrics": {"port": free_port()}, "batch": {"max_wait_ms": 20}, "config": {"directory": str(out)}}}},
        tmp_path)
    es_proc = collect_process("es", "elasticsearch", {"kafka": kafka, "collectors": {"elasticsearch": {
        "metrics": {"port": free_port()}, "batch": {"max_wait_ms": 20},
        "config": {"hosts": [es_url], "index_prefix": topic_prefix}}}}, tmp_path)
    async with HostileUpstream() as upstream:
        document = tap_config(upstream.url, kafka_bootstrap, topic_prefix, tmp_path / "spool", tap={"limits": LIMITS})
        async with running_tap(document) as tap:
            _, rejected, _ = await exchange(tap.url, request("/llm/openai/v1/models", [("x-big", "a" * 1100)]))
            _, undecodable, _ = await exchange(tap.url, request("/llm/openai/v1/chat/completions",
                                                                [*KEY, *JSON, ("x-foo", "\xff")], "POST", CHAT))
    ids = {rejected["x-request-id"]: 431, undecodable["x-request-id"]: 200}
    await asyncio.gather(asyncio.to_thread(file_proc.start), asyncio.to_thread(es_proc.start))
    try:
        def in_files() -> bool:
            return ids.keys() <= {e["request_id"] for e in written(out, "proxy_log")}

        await wait_for(in_files, "both proxy_logs in the files", limit=60)
        async with AsyncElasticsearch(es_url) as es:
            alias = tpl.alias_name(topic_prefix, "proxy_log")

            async def in_es() -> dict[str, Any]:
                await es.indices.refresh(index=alias)
                found = await es.search(index=alias, query={"terms": {"request_id": list(ids)}})
                return {hit["_source"]["request_id"]: hit["_source"] for hit in found["hits"]["hits"]}

            docs: dict[str, Any] = {}
            async with asyncio.timeout(60):
                while len(docs) < len(ids):
                    try:
                        docs = await in_es()
                    except Exception:  # the index appears with the first batch
                        docs = {}
                    await asyncio.sleep(0.2)
    finally:
        await asyncio.gather(asyncio.to_thread(file_proc.stop), asyncio.to_thread(es_proc.stop))
    files = {e["request_id"]: e for e in written(out, "proxy_log")}
    for rid, status in ids.items():
        assert files[rid]["status_code"] == docs[rid]["status_code"] == status
    assert files[undecodable["x-request-id"]]["request_headers"]["x-foo"] == "\\xff"
