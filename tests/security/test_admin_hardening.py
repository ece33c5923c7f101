"""The admin API under attack (issue 21, item 9), against the real tap (``serve --workers 2``) with its state in SQLite
and PostgreSQL: every error is JSON (deeply nested metadata included, and requests the HTTP parser rejects), plugin
configs with header values no header may carry are refused by the API and at YAML load, audit records carry a
request id made by the API, refused calls are logged (never the token) and counted, one id grammar holds for every
id (in bodies, in paths and in what workers apply), and ``gateway-tap admin`` escapes control characters."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from multidict import CIMultiDict
from yarl import URL

from gateway_tap.admin.db import connect
from gateway_tap.admin.store import AdminStore
from gateway_tap.settings import BudgetStoreSettings
from tests.support.admin import ADMIN_TOKEN, AdminTap, admin_document, admin_tap, audit_records
from tests.support.tap import APP_KEY, EXAMPLE_PLUGINS

pytestmark = pytest.mark.integration

READ_TOKEN = "gt-read-token-for-tests-0123456789"


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def _raw(tap: AdminTap, method: str, path: str, *, body: bytes | None = None, token: str | None = ADMIN_TOKEN,
               headers: dict[str, str] | None = None) -> tuple[int, str, CIMultiDict[str], Any]:
    """(status, content type, headers, decoded JSON) of one call with an already encoded ``path``."""
    sent = {"authorization": f"Bearer {token}"} if token is not None else {}
    sent.update(headers or {})
    if body is not None:
        sent["content-type"] = "application/json"
    async with aiohttp.ClientSession() as http, http.request(
            method, URL(tap.admin_url + path, encoded=True), data=body, headers=sent) as resp:
        return resp.status, resp.content_type, CIMultiDict(resp.headers), await resp.json(content_type=None)


def _cli(tap: AdminTap, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "GATEWAY_TAP_ADMIN_URL": tap.admin_url, "GATEWAY_TAP_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run([sys.executable, "-m", "gateway_tap", "admin", *args], env=env, capture_output=True,
                          timeout=60)


async def test_every_error_is_json_and_every_id_follows_one_grammar(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings)
    async with admin_tap(document, tmp_path) as tap:
        # metadata nested 300 deep: was a plain-text 500 with a traceback.
        deep = b'{"id": "deep", "metadata": ' + b'{"a": ' * 300 + b"1" + b"}" * 300 + b"}"
        status, ctype, headers, answer = await _raw(tap, "POST", "/v1/apps", body=deep)
        assert (status, ctype, answer["error"]["code"], answer["error"]["param"]) == \
            (422, "application/json", "validation_error", "metadata"), answer
        assert "nested deeper than 8 levels" in answer["error"]["message"]
        assert headers["x-request-id"] == answer["error"]["request_id"]
        assert (await tap.call("POST", "/v1/apps", {"id": "deep", "metadata": _nested(9)}))[0] == 422
        assert (await tap.call("POST", "/v1/apps", {"id": "deep", "metadata": _nested(8)}))[0] == 201
        status, answer = await tap.call("PATCH", "/v1/apps/deep", {"metadata": _nested(50)})
        assert (status, answer["error"]["param"]) == (422, "metadata")
        status, answer = await tap.call("POST", "/v1/apps", {"id": "bell", "name": "ring\x07\x1b[2J"})
        assert (status, answer["error"]["param"]) == (422, "name"), answer

        # Every kind of error is JSON with the request id: unknown path, wrong method, bad JSON, not an object,
        # too large, and what the HTTP parser itself rejects.
        for method, path, body, want in [("GET", "/v1/nothing", None, 404), ("PUT", "/v1/apps", b"{}", 405),
                                         ("POST", "/v1/apps", b"{not json", 400), ("POST", "/v1/apps", b"[1]", 422),
                                         ("POST", "/v1/apps", b'{"id": "' + b"x" * 70_000 + b'"}', 413)]:
            status, ctype, headers, answer = await _raw(tap, method, path, body=body)
            assert (status, ctype) == (want, "application/json"), (method, path, answer)
            assert answer["error"]["request_id"] == headers["x-request-id"]
        reader, writer = await asyncio.open_connection("127.0.0.1", int(URL(tap.admin_url).port or 0))
        writer.write(b"GET /v1/apps HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n")
        raw = await reader.read()
        writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request") and b"application/json" in head
        assert b"x-request-id: " in head.lower()
        assert b'"type":"invalid_request_error"' in payload, raw

        # One id grammar: 1-64 of [A-Za-z0-9._-], not starting with '.' or '-'; in bodies ...
        for bad in ("a" * 60_000, "a" * 65, ".", "..", "-rf", "a/b", "a b", ""):
            status, answer = await tap.call("POST", "/v1/apps", {"id": bad})
            assert (status, answer["error"]["param"]) == (422, "id"), (bad[:10], answer)
        assert (await tap.call("POST", "/v1/apps", {"id": "a" * 64}))[0] == 201
        status, answer = await tap.call("PUT", "/v1/apps/deep/budgets", {"llm_id": "..", "limit_usd": 1})
        assert (status, answer["error"]["param"]) == (422, "llm_id"), answer
        status, answer = await tap.call("POST", "/v1/plugins", {"name": "..", "use": "x"})
        assert (status, answer["error"]["param"]) == (422, "name"), answer
        # ... and in paths (so an id is never too long to address, nor a dot-segment).
        for path in ("/v1/apps/" + "a" * 65, "/v1/apps/%2e%2e", "/v1/apps/%2E", "/v1/apps/deep/keys/%2e%2e",
                     "/v1/apps/deep/keys/" + "k" * 100 + "/rotate", "/v1/plugins/%2e%2e/config",
                     "/v1/apps/a%0Ab"):
            status, ctype, _, answer = await _raw(tap, "DELETE" if "rotate" not in path else "POST", path)
            assert (status, answer["error"]["code"]) == (422, "invalid_id"), (path, answer)
        status, ctype, _, answer = await _raw(tap, "DELETE", "/v1/apps/deep/budgets?llm_id=%2e%2e")
        assert (status, answer["error"]["param"]) == (422, "llm_id"), answer
        _, state = await tap.call("GET", "/v1/status")
        version = state["version"]
        assert version == 2  # only the two valid apps were stored

        # Entries stored before the grammar (or by hand) are left out by the workers, never fatal.
        store = AdminStore(await connect(budget_store_settings, migrate=False))
        try:
            await store.create_app("..", "", ["*"], {})
            await store.create_app("x" * 70, "", ["*"], {})
        finally:
            await store.close()
        assert (await tap.call("POST", "/v1/apps", {"id": "after"}))[0] == 201
        _, issued = await tap.call("POST", "/v1/apps/after/keys")
        await tap.wait_version(version + 4)
        async with aiohttp.ClientSession() as http, http.post(
                f"{tap.url}/llm/openai/v1/chat/completions", headers={"authorization": f"Bearer {issued['key']}"},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200
        _, state = await tap.call("GET", "/v1/status")
        for worker in [t for t in state["taps"] if t["gateway_id"] == document["gateway_id"]]:
            assert {r["entry"] for r in worker["rejected"]} == {"apps/..", "apps/" + "x" * 70}, worker


async def test_plugin_header_values_must_be_header_safe(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    enricher = EXAMPLE_PLUGINS[1]  # request_enricher: headers sent upstream, app_header
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                              plugins=[enricher])
    async with admin_tap(document, tmp_path) as tap:
        for config, param in [({"headers": {"x-a": "v\r\nx-injected: 1"}}, "config.headers.x-a"),
                              ({"headers": {"x-a": "v\n"}}, "config.headers.x-a"),
                              ({"headers": {"x-a": "nul\x00"}}, "config.headers.x-a"),
                              ({"headers": {"x a": "v"}}, "config.headers"),
                              ({"app_header": "x-app\r\n"}, "config.app_header")]:
            status, answer = await tap.call("PUT", "/v1/plugins/request_enricher/config", {"config": config})
            assert (status, answer["error"]["code"], answer["error"]["param"]) == \
                (422, "invalid_plugin_config", param), (config, answer)
        _, state = await tap.call("GET", "/v1/status")
        assert state["version"] == 0
        async with aiohttp.ClientSession() as http, http.post(
                f"{tap.url}/llm/openai/v1/chat/completions", headers={"authorization": f"Bearer {APP_KEY}"},
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            assert resp.status == 200
    # The same value in the YAML file fails check-config (and so serve) naming the key.
    bad = {**document, "plugins": [{**enricher, "config": {"headers": {"x-a": "v\r\nx-injected: 1"}}}]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "gateway_tap", "check-config", str(path)], capture_output=True,
        text=True, timeout=60, env={**os.environ, "GATEWAY_TAP_TEST_ADMIN_TOKEN": "t"})
    assert result.returncode == 1 and "plugins[0].config.headers.x-a" in result.stderr, result.stderr


async def test_audit_request_ids_are_made_by_the_api_and_refused_calls_are_logged(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings)
    document["tap"]["admin"]["tokens"].append(
        {"id": "viewer", "role": "read", "token_hash": "sha256:" + hashlib.sha256(READ_TOKEN.encode()).hexdigest()})
    async with admin_tap(document, tmp_path) as tap:
        answers = []
        for client_id in ("client-chosen-id", "x" * 500, "has space"):
            status, _, headers, _ = await _raw(tap, "POST", "/v1/apps", body=b'{"id": "a%d"}' % len(answers),
                                               headers={"x-request-id": client_id})
            assert status == 201 and headers["x-request-id"].startswith("adm_")
            answers.append(headers["x-request-id"])
        audits = [a["payload"] for a in await audit_records(kafka_bootstrap, topic_prefix, 3)]
        assert [a["request_id"] for a in audits] == answers
        assert [a["client_request_id"] for a in audits] == ["client-chosen-id", None, None]
        assert "admin change: app.create apps/a0 by ops (version 1)" in tap.log_path.read_text()

        # Refused calls: logged with the reason, the caller and the request id, never the token; counted.
        wrong = "gt-wrong-admin-token-secret-value"
        for _ in range(3):
            assert (await _raw(tap, "GET", "/v1/apps", token=wrong))[0] == 401
        assert (await _raw(tap, "GET", "/v1/apps", token=None))[0] == 401
        status, _, headers, _ = await _raw(tap, "POST", "/v1/apps", body=b'{"id": "r"}', token=READ_TOKEN)
        assert status == 403
        await asyncio.sleep(0.5)
        log = tap.log_path.read_text()
        assert log.count("admin call refused: invalid_admin_token: GET /v1/apps from 127.0.0.1") == 3, log[-2000:]
        assert "admin call refused: missing_admin_token" in log
        assert f"admin call refused: read_only_token: POST /v1/apps from 127.0.0.1 with token 'viewer' " \
               f"(request id {headers['x-request-id']})" in log
        assert wrong not in log and READ_TOKEN not in log and ADMIN_TOKEN not in log
        # A flood is counted in full but logged at most 10 times per 10 s per worker.
        await asyncio.gather(*(_raw(tap, "GET", "/v1/apps", token=wrong) for _ in range(60)))
        await asyncio.sleep(0.5)
        assert tap.log_path.read_text().count("admin call refused: invalid_admin_token") <= 20
        async with aiohttp.ClientSession() as http, http.get(tap.metrics_url) as resp:
            metrics = await resp.text()
        assert 'gateway_tap_admin_auth_failures_total{reason="invalid_admin_token"} 63.0' in metrics
        assert 'gateway_tap_admin_auth_failures_total{reason="read_only_token"} 1.0' in metrics


async def test_cli_output_escapes_control_characters(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
        budget_store_settings: BudgetStoreSettings) -> None:
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings)
    async with admin_tap(document, tmp_path) as tap:
        # The API refuses them now; a state written before (or by hand) may still hold them.
        store = AdminStore(await connect(budget_store_settings, migrate=False))
        try:
            await store.create_app("evil", "name\x1b[2J\x1b]0;owned\x07\u202eright-to-left", ["*"],
                                   {"k": "v\x1b[31m", "\x1b": "x"})
        finally:
            await store.close()
        for args in (["apps", "list"], ["apps", "get", "evil"]):
            result = await asyncio.to_thread(_cli, tap, *args)
            assert result.returncode == 0, result.stderr
            out = result.stdout
            assert b"\x1b" not in out and b"\x07" not in out and "\u202e".encode() not in out, out
            assert b"evil" in out and (b"\\x1b[2J" in out or args[1] == "get"), out
        result = await asyncio.to_thread(_cli, tap, "apps", "get", "evil")
        assert b"\\x1b[2J\\x1b]0;owned\\x07\\u202eright-to-left" in result.stdout, result.stdout
        result = await asyncio.to_thread(_cli, tap, "apps", "create", "bell", "--name", "ring\x1b[2J")
        assert result.returncode == 1 and b"\x1b" not in result.stderr and b"422" in result.stderr, result.stderr
