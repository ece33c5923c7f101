"""Issue 21 item 1: the upstream path is confined below ``upstream_url``'s path, whatever the client writes.

Against the real tap (served in this loop, events to Kafka) with an upstream of the tests' own mounted at a base
path, requests are sent with their target exactly as written (``curl --path-as-is``). A hostile path gets a JSON
400 with its code and request id, is recorded as a proxy_log with that status, and reaches the upstream not at
all; a harmless one is normalised, and the path the upstream received is the logged one below the base path.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway_tap.hooks import HookContext, TapRequest
from tests.support.hostile_upstream import HostileUpstream, RawResponse, raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

BASE = "/openai/deployments/gpt4"
AUTH = {"Authorization": f"Bearer {APP_KEY}"}

OUTSIDE = [  # dot-segments, however spelled, that climb above the base path
    "/llm/based/../../../admin/keys",
    "/llm/based/..",
    "/llm/based/%2e%2e/%2e%2e/%2e%2e/admin/keys",
    "/llm/based/%2E%2E/admin/keys",
    "/llm/based/.%2e/admin/keys",
    "/llm/based/%2e./admin/keys",
    "/llm/based/v1/../../admin/keys",
    "/llm/based/v1/%2e%2e/%2e%2e/admin/keys?x=1",
    "/llm/based/./../admin",
    "/llm/based/v1/chat/../../../x",
]
INVALID = [  # what an upstream might read as a separator or a dot-segment: refused rather than guessed at
    "/llm/based/..%2f..%2f..%2fadmin/keys",
    "/llm/based/..%2F..%2Fadmin/keys",
    "/llm/based/%2e%2e%2fadmin",
    "/llm/based/v1%2f..%2f..%2fadmin",
    "/llm/based/%5c..%5c..%5cadmin",
    "/llm/based/..%5Cadmin",
    "/llm/based/..\\..\\admin\\keys",
    "/llm/based/v1\\chat",
    "/llm/based//admin/keys",
    "/llm/based/v1//chat/completions",
    "/llm/based/v1/%2f%2fevil.example/x",
    "/llm/based/v1/a%00b",
    "/llm/based/v1/%7f",
    "/llm/based/%252e%252e/%252e%252e/admin",
    "/llm/based/%252f..%252fadmin",
    "/llm/based/..;/..;/admin",
    "/llm/based/v1/.;x/admin",
    "/llm/based/a%zz",
    "/llm/based/a%2",
]
FORWARDED = [  # (target, path the upstream must receive): normalised, confined, the query untouched
    ("/llm/based/v1/chat/completions", BASE + "/v1/chat/completions"),
    ("/llm/based/v1/x/../chat/completions", BASE + "/v1/chat/completions"),
    ("/llm/based/./v1/%2e/chat/./completions", BASE + "/v1/chat/completions"),
    ("/llm/based/v1/%63hat/%63ompletions", BASE + "/v1/chat/completions"),
    ("/llm/based/v1/models/gpt%204o%3Amini", BASE + "/v1/models/gpt%204o%3Amini"),
    ("/llm/based/v1/models/gpt%2d4o", BASE + "/v1/models/gpt-4o"),
    ("/llm/based/v1/models/", BASE + "/v1/models/"),
    ("/llm/based/v1/models/x/..", BASE + "/v1/models/"),
    ("/llm/based/v1/files?purpose=../../admin&x=%2e%2e%2f", BASE + "/v1/files"),
    # The id is matched decoded; the rest is never cut by the decoded id's length (main sent ".../gpt4/d/v1/...").
    ("/llm/%62ased/v1/chat/completions", BASE + "/v1/chat/completions"),
    ("/llm/%62%61%73%65%64/v1/chat/completions", BASE + "/v1/chat/completions"),
    ("/llm/based/", BASE + "/"),
]


class PathRewriter:
    """A post-auth hook that rewrites the path to the request's ``x-rewrite-path`` (as a careless plugin might)."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> None:
        rewrite = request.headers.get("x-rewrite-path")
        if rewrite is not None:
            request.path = rewrite


@pytest.fixture(scope="module")
async def tap(upstream: HostileUpstream, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    spool: Path = tmp_path_factory.mktemp("upstream-path")
    document = tap_config(upstream.url, kafka_bootstrap, "sec-path", spool, extra_llms=[
        {"id": "based", "vendor": "openai", "upstream_url": upstream.url + BASE,
         "api_key_env": "TAP_TEST_UPSTREAM_KEY"}],
        plugins=[{"name": "rewriter", "use": "tests.security.test_upstream_path:PathRewriter"}])
    async with running_tap(document) as running:
        yield running


async def _send(tap: RunningTap, target: str, **kw: Any) -> RawResponse:
    return await raw_request(tap.url, target, method="POST", headers={**AUTH, "content-type": "application/json",
                                                                        **kw.pop("headers", {})},
                             body=b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}', **kw)


async def _proxy_logs(kafka_bootstrap: str, request_ids: list[str]) -> dict[str, Any]:
    found = await events_for(kafka_bootstrap, "sec-path", request_ids)
    return {rid: found.get(rid) for rid in request_ids}


async def test_hostile_paths_are_refused_recorded_and_never_reach_the_upstream(
        tap: RunningTap, upstream: HostileUpstream, kafka_bootstrap: str) -> None:
    answers: dict[str, tuple[str, RawResponse]] = {}
    for target in OUTSIDE + INVALID:
        resp = await _send(tap, target)
        code = "path_outside_upstream" if target in OUTSIDE else "invalid_path"
        assert resp.status == 400, (target, resp.status, resp.body[:300])
        error = resp.json()["error"]
        assert error["code"] == code, (target, error)
        assert error["type"] == "invalid_request_error"
        assert error["request_id"] == resp.headers["x-request-id"]
        assert upstream.for_request(error["request_id"]) == [], target
        answers[error["request_id"]] = (code, resp)
    # Nothing arrived upstream outside the base path, from any request of this test.
    assert all(r.path.startswith(BASE + "/") for r in upstream.received), [r.target for r in upstream.received]
    logs = await _proxy_logs(kafka_bootstrap, list(answers))
    for rid, (code, _) in answers.items():
        log = logs[rid]
        assert log is not None, f"no proxy_log for {rid}"
        assert (log.status_code, log.error.code, log.llm_id) == (400, code, "based")


async def test_harmless_paths_are_normalised_and_the_logged_path_is_the_forwarded_one(
        tap: RunningTap, upstream: HostileUpstream, kafka_bootstrap: str) -> None:
    sent: dict[str, tuple[str, str]] = {}
    for target, expected in FORWARDED:
        resp = await _send(tap, target)
        assert resp.status == 200, (target, resp.status, resp.body[:300])
        rid = resp.headers["x-request-id"]
        [got] = upstream.for_request(rid)
        assert got.path == expected, target
        assert got.query == (target.partition("?")[2]), target  # the query passes through unchanged
        assert got.headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"  # the tap's credential, on its route
        sent[rid] = (target, got.path)
    logs = await _proxy_logs(kafka_bootstrap, list(sent))
    for rid, (target, upstream_path) in sent.items():
        log = logs[rid]
        assert log is not None, f"no proxy_log for {rid}"
        assert log.status_code == 200
        assert BASE + log.path.removeprefix("/llm/based") == upstream_path, target


async def test_a_hook_cannot_send_the_request_outside_the_base_path(
        tap: RunningTap, upstream: HostileUpstream, kafka_bootstrap: str) -> None:
    refused = await _send(tap, "/llm/based/v1/chat/completions", headers={"x-rewrite-path": "../../admin/keys"})
    assert (refused.status, refused.json()["error"]["code"]) == (400, "path_outside_upstream")
    assert upstream.for_request(refused.headers["x-request-id"]) == []
    rewritten = await _send(tap, "/llm/based/v1/chat/completions", headers={"x-rewrite-path": "v1/%65mbeddings"})
    assert rewritten.status == 200
    [got] = upstream.for_request(rewritten.headers["x-request-id"])
    assert got.path == BASE + "/v1/embeddings"
    logs = await _proxy_logs(kafka_bootstrap, [refused.headers["x-request-id"], rewritten.headers["x-request-id"]])
    assert logs[rewritten.headers["x-request-id"]].path == "/llm/based/v1/embeddings"
    assert logs[refused.headers["x-request-id"]].status_code == 400


async def test_an_encoded_slash_in_the_llm_id_does_not_route(tap: RunningTap, upstream: HostileUpstream) -> None:
    before = len(upstream.received)
    for target in ("/llm/based%2f..%2f..%2fadmin/keys", "/llm/%2e%2e/admin/keys", "/llm/../admin/keys",
                   "/llm/based%2fv1/chat/completions"):
        resp = await _send(tap, target)
        assert resp.status in (400, 404), (target, resp.status)
        assert resp.json()["error"]["request_id"] == resp.headers["x-request-id"]
    # A CR/LF does not even match the route (its 404 is issue 21 item 7's): it must not be forwarded either.
    for target in ("/llm/based/v1%0d%0aX-Injected:%201", "/llm/based/v1/%0a"):
        assert (await _send(tap, target)).status in (400, 404), target
    assert len(upstream.received) == before
