"""Per-key controls and rate limits through the admin API, applied by ``gateway-tap serve --workers 2`` with shared
(Redis) limits: a key issued with a name, an expiry and its own limits; an app's limits set, listed and deleted
through the API and the CLI with the file's validation; an expired key refused with 401 ``expired_api_key``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner

from gateway_tap.cli import main
from gateway_tap.settings import BudgetStoreSettings
from tests.support.admin import ADMIN_TOKEN, AdminTap, admin_document, admin_tap


async def chat(tap: AdminTap, key: str) -> tuple[int, Any]:
    # A new connection per request: with SO_REUSEPORT either worker may answer.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http, http.post(
            f"{tap.url}/llm/openai/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
            json={"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}) as resp:
        return resp.status, await resp.json()


async def test_key_name_expiry_and_limits_and_app_limits_through_the_api(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path, redis_url: str) -> None:
    store = BudgetStoreSettings(sqlite_path=str(tmp_path / "state.sqlite3"))
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, store)
    document["rate_limiting"] = {"mode": "shared"}  # exact across the two workers
    document["redis"] = {"url": redis_url, "key_prefix": f"{topic_prefix}:"}
    async with admin_tap(document, tmp_path) as tap:
        assert (await tap.call("POST", "/v1/apps", {"id": "team-a", "allowed_llms": ["openai"]}))[0] == 201
        # Validation as the file's: a zero limit, a model without an LLM, an unknown LLM, an expiry in the past.
        status, error = await tap.call("POST", "/v1/apps/team-a/keys", {"rate_limits": {"requests_per_minute": 0}})
        assert status == 422 and error["error"]["param"] == "rate_limits.requests_per_minute", error
        status, error = await tap.call("PUT", "/v1/apps/team-a/rate-limits", {"model": "m", "requests_per_minute": 1})
        assert status == 422 and "model needs llm_id" in error["error"]["message"], error
        status, error = await tap.call("PUT", "/v1/apps/team-a/rate-limits", {"llm_id": "nope",
                                                                              "requests_per_minute": 1})
        assert status == 422 and error["error"]["code"] == "unknown_llm", error
        status, error = await tap.call("POST", "/v1/apps/team-a/keys", {"expires_at": "2020-01-01T00:00:00Z"})
        assert status == 422 and error["error"]["param"] == "expires_at", error

        issued_at = time.time()
        status, key = await tap.call("POST", "/v1/apps/team-a/keys", {
            "name": "ci runner", "expires_in_s": 8, "rate_limits": {"requests_per_minute": 2}})
        assert status == 201, key
        assert key["name"] == "ci runner" and key["rate_limits"] == {"requests_per_minute": 2}
        assert key["state"] == "expiring" and key["expires_at"] is not None
        await tap.wait_version(2)
        answers = [await chat(tap, key["key"]) for _ in range(3)]
        assert [s for s, _ in answers] == [200, 200, 429]  # the key's own limit, across both workers
        # The refusal names the key by its id, never by its hash.
        assert answers[2][1]["error"]["code"] == "rate_limit_exceeded" and f"for key {key['id']} on" in \
            answers[2][1]["error"]["message"] and "sha256" not in answers[2][1]["error"]["message"]

        # The app's limits, through the CLI (one validation path: the API's), and read back.
        def cli(*args: str) -> tuple[int, str]:
            result = CliRunner().invoke(main, ["admin", "--url", tap.admin_url, *args],
                                        env={"GATEWAY_TAP_ADMIN_TOKEN": ADMIN_TOKEN})
            return result.exit_code, result.output

        code, out = await asyncio.to_thread(cli, "rate-limits", "set", "team-a", "--rpm", "3", "--concurrent", "5")
        assert code == 0, out
        code, out = await asyncio.to_thread(cli, "rate-limits", "set", "team-a", "--llm", "openai", "--model",
                                            "gpt-4o-mini", "--rpm", "0")
        assert code != 0 and "requests_per_minute" in out
        code, out = await asyncio.to_thread(cli, "rate-limits", "list", "team-a", "--json")
        listed = json.loads(out)["data"]
        assert [(r["settings"]["requests_per_minute"], r["settings"]["max_concurrent"], r["source"])
                for r in listed] == [(3, 5, "api")]
        status, other = await tap.call("POST", "/v1/apps/team-a/keys", {"name": "no limits of its own"})
        await tap.wait_version(4)
        # The app counter started with the limit: 3 of the other key's requests pass, then the app is refused.
        assert [(await chat(tap, other["key"]))[0] for _ in range(4)] == [200, 200, 200, 429]
        code, out = await asyncio.to_thread(cli, "rate-limits", "delete", "team-a")
        assert code == 0, out
        await tap.wait_version(5)
        assert (await chat(tap, other["key"]))[0] == 200

        # The named key expires: 401 expired_api_key (not invalid_api_key), once the workers applied it.
        await asyncio.sleep(max(0.0, issued_at + 8.5 - time.time()))
        for _ in range(50):
            status, body = await chat(tap, key["key"])
            if status == 401:
                break
            await asyncio.sleep(0.1)
        assert status == 401 and body["error"]["code"] == "expired_api_key", body
        status, listed_keys = await tap.call("GET", "/v1/apps/team-a/keys")
        states = {k["name"]: k["state"] for k in listed_keys["data"]}
        assert states == {"ci runner": "expired", "no limits of its own": "active"}
        assert (await chat(tap, "gt-not-a-key-at-all"))[1]["error"]["code"] == "invalid_api_key"
