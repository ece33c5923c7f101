"""Issue 21 item 6: with ``capture_bodies: true``, no credential the tap can know of is stored.

Found stored unredacted: the upstream key an upstream echoed in its 401 body, a client key sent in a custom header
or the User-Agent, ``password=`` in a form body. Against the real tap (events to Kafka) with an upstream of the
tests' own that echoes the credential it received (body and a response header, as some APIs do in their errors):
the upstream key (verbatim), the client's own key (verbatim, whatever its shape), issued keys (``gt-...``), and
secret-shaped text are redacted from headers, bodies, the user agent, the path and metadata. docs/security.md
says what capture does not redact.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway_tap.admin.state import new_key
from gateway_tap.dev.servers import free_port
from gateway_tap.hooks import HookContext, TapRequest
from schemas import ProxyLog
from tests.support.hostile_upstream import raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

PLAIN_KEY = "Kx7Vt2pLq8WmZ4rNy6Bd"
"""An app key of no recognisable shape (a YAML key_hashes entry can be anything): only known verbatim."""
REDACTED = "[REDACTED]"
ISSUED_KEY = new_key()[0]
"""A key as the admin API issues it: ``gt-`` and 43 URL-safe characters (its visible prefix is ``gt-`` + 7)."""


class MetadataCopier:
    """Copies the request's ``x-note`` header into metadata, as an enrichment plugin might."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> None:
        note = request.headers.get("x-note")
        if note is not None:
            ctx.metadata["note"] = note


async def _echo(request: web.Request) -> web.Response:
    """An upstream that refuses the credential and says which one it got, in the body and a header."""
    received = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
    await request.read()
    return web.json_response({"error": {"message": f"Incorrect API key provided: {received}. Check it.",
                                        "type": "invalid_request_error", "code": "invalid_api_key"}},
                             status=401, headers={"x-received-credential": received})


@pytest.fixture(scope="module")
async def tap(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    document = tap_config(f"http://127.0.0.1:{port}", kafka_bootstrap, "sec-capture",
                          tmp_path_factory.mktemp("capture") / "spool", tap={"capture_bodies": True},
                          plugins=[{"name": "copier", "use": f"{__name__}:MetadataCopier"}])
    document["apps"].append({"id": "plain", "key_hashes": [
        "sha256:" + hashlib.sha256(PLAIN_KEY.encode()).hexdigest()]})
    try:
        async with running_tap(document) as running:
            yield running
    finally:
        await runner.cleanup()


SECRETS = [UPSTREAM_SECRET, APP_KEY, PLAIN_KEY, ISSUED_KEY, ISSUED_KEY[10:], "hunter2", "s3cr3t-t0ken",
           "AKIAIOSFODNN7EXAMPLE"]


async def test_captured_exchanges_hold_no_known_credential(tap: RunningTap, kafka_bootstrap: str) -> None:
    chat = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"my other key is %s"}]}'
    requests = {
        # The upstream echoes the tap's own key back in its 401 (body and header).
        "echoed upstream key": ("/llm/openai/v1/chat/completions", {
            "authorization": f"Bearer {APP_KEY}", "x-custom": APP_KEY, "user-agent": f"sdk/1.0 (key={APP_KEY})",
            "content-type": "application/json"}, (chat % ISSUED_KEY).encode()),
        # A key of no shape: known because the request presented it; repeated in a header, the agent, metadata.
        "presented plain key": ("/llm/openai/v1/chat/completions", {
            "x-api-key": PLAIN_KEY, "x-forward-auth": PLAIN_KEY, "user-agent": f"tool {PLAIN_KEY}",
            "x-note": f"caller {PLAIN_KEY}", "content-type": "application/json"}, (chat % PLAIN_KEY).encode()),
        "form body": ("/llm/anthropic/v1/messages", {
            "x-api-key": APP_KEY, "content-type": "application/x-www-form-urlencoded"},
            b"user=bob&password=hunter2&access_token=s3cr3t-t0ken&aws=AKIAIOSFODNN7EXAMPLE"),
        "key in the path": (f"/llm/openai/v1/keys/{ISSUED_KEY}", {"authorization": f"Bearer {APP_KEY}"}, b""),
    }
    ids: dict[str, str] = {}
    for name, (target, headers, body) in requests.items():
        resp = await raw_request(tap.url, target, method="POST", headers=headers, body=body)
        assert resp.status == 401, (name, resp.status, resp.body[:200])
        assert UPSTREAM_SECRET in resp.body.decode()  # the client gets the upstream's answer as it was
        ids[name] = resp.headers["x-request-id"]
    logs = await events_for(kafka_bootstrap, "sec-capture", list(ids.values()))
    for name, rid in ids.items():
        log = logs.get(rid)
        assert isinstance(log, ProxyLog), f"no proxy_log for {name}"
        stored = log.model_dump_json()
        leaked = [s for s in SECRETS if s in stored]
        assert not leaked, f"{name}: {leaked} stored in {stored}"
        assert log.response_body is not None and REDACTED in log.response_body, name
        assert log.response_headers["x-received-credential"] in (REDACTED, f"Bearer {REDACTED}"), name
    echoed = logs[ids["echoed upstream key"]]
    assert isinstance(echoed, ProxyLog) and echoed.request_headers["x-custom"] == REDACTED
    assert echoed.user_agent == f"sdk/1.0 (key={REDACTED})"
    plain = logs[ids["presented plain key"]]
    assert isinstance(plain, ProxyLog) and plain.metadata == {"note": f"caller {REDACTED}"}
    form = logs[ids["form body"]]
    assert isinstance(form, ProxyLog)
    assert form.request_body == f"user=bob&password={REDACTED}&access_token={REDACTED}&aws={REDACTED}"
    assert logs[ids["key in the path"]].path == f"/llm/openai/v1/keys/{REDACTED}"  # type: ignore[attr-defined]
