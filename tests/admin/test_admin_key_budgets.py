"""Per-key budgets end to end: keys issued through the admin API of ``gateway-tap serve --workers 2`` get budgets of
their own (API and CLI, the same validation), the tap refuses a key over its hard budget with 429
``insufficient_quota`` while another key of the same app goes on, a rotated key's successor keeps the budget and the
spend, and ``gateway-tap collect budget`` records every request's key so that the ledger equals the budget_usage
events to the micro-USD, per key, on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import CliRunner

from gateway_tap.admin.db import connect
from gateway_tap.apps import hash_key
from gateway_tap.budgets.periods import period_start, usd_to_micros
from gateway_tap.budgets.store import open_store
from gateway_tap.cli import main
from gateway_tap.dev.servers import free_port
from gateway_tap.ops.status import gather_status
from gateway_tap.settings import BudgetStoreSettings, default_key_id, parse_config
from schemas import BudgetUsage
from tests.support.admin import ADMIN_TOKEN, AdminTap, admin_document, admin_tap
from tests.support.collectors import collect_process, create_topics
from tests.support.tap import APP_KEY, OPENAI_PRICE, by_request, read_events

# 400 prompt characters (100 tokens by the tap's /4 estimate, as the mock counts them) and 50 completion tokens:
# every request's estimate is its exact cost, so a hard budget is never overspent.
BODY = {"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "x" * 400}]}
COST_MICROS = usd_to_micros((100 * OPENAI_PRICE["input_per_1m"] + 50 * OPENAI_PRICE["output_per_1m"]) / 1_000_000)
KEY_LIMIT_USD = 0.0002  # four requests fit, the fifth does not


async def chat(http: aiohttp.ClientSession, tap: AdminTap, key: str) -> tuple[int, Any, str]:
    async with http.post(f"{tap.url}/llm/openai/v1/chat/completions", json=BODY,
                         headers={"authorization": f"Bearer {key}"}) as resp:
        return resp.status, await resp.json(), resp.headers["x-request-id"]


async def get_budget(http: aiohttp.ClientSession, tap: AdminTap, key: str) -> Any:
    async with http.get(f"{tap.url}/budget", headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        return await resp.json()


def cli(tap: AdminTap, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["admin", "--url", tap.admin_url, *args],
                                env={"GATEWAY_TAP_ADMIN_TOKEN": ADMIN_TOKEN})
    return result.exit_code, result.output


async def test_a_keys_budget_refuses_it_alone_survives_rotation_and_the_ledger_equals_the_events(
        budget_store_settings: BudgetStoreSettings, mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    document = admin_document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings)
    document["budget_store"] = budget_store_settings.model_dump(mode="json")
    document["collectors"] = {"budget": {"group_id": f"{topic_prefix}-budget",
                                         "group_instance_id": f"{topic_prefix}-budget-1", "session_timeout_ms": 10_000,
                                         "batch": {"max_events": 20, "max_wait_ms": 10},
                                         "metrics": {"port": free_port()}}}
    await create_topics(kafka_bootstrap, topic_prefix)
    collector = collect_process("key-budgets", "budget", document, tmp_path)
    await asyncio.to_thread(collector.start)
    try:
        async with admin_tap(document, tmp_path) as tap, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as http:
            assert (await tap.call("POST", "/v1/apps", {"id": "team-a", "allowed_llms": ["openai"]}))[0] == 201
            assert (await tap.call("PUT", "/v1/apps/team-a/budgets", {"limit_usd": 1.0}))[0] == 200  # the app's
            _, small = await tap.call("POST", "/v1/apps/team-a/keys", {"name": "small"})
            _, other = await tap.call("POST", "/v1/apps/team-a/keys", {"name": "other"})
            assert small["lineage_id"] == small["id"]

            # The key's budget through the CLI (the API's validation: 422 naming the field, nothing stored).
            code, out = await asyncio.to_thread(cli, tap, "budgets", "set", "team-a", "--key", small["id"],
                                                "--usd", "-1")
            assert code != 0 and "limit_usd" in out
            code, out = await asyncio.to_thread(cli, tap, "budgets", "set", "team-a", "--key", "key_nope", "--usd", "1")
            assert code != 0 and "404" in out
            code, out = await asyncio.to_thread(cli, tap, "budgets", "set", "team-a", "--key", small["id"], "--usd",
                                                str(KEY_LIMIT_USD), "--period", "daily")
            assert code == 0, out
            status, listed = await tap.call("GET", f"/v1/apps/team-a/keys/{small['id']}/budgets")
            assert status == 200 and [b["settings"]["key_id"] for b in listed["data"]] == [small["id"]]
            await tap.wait_version(5)

            # Concurrent requests of both keys: the small key gets exactly what its budget holds, the other all.
            answers = await asyncio.gather(*(chat(http, tap, (small, other)[i % 2]["key"]) for i in range(24)))
            small_ok = [a for i, a in enumerate(answers) if i % 2 == 0 and a[0] == 200]
            small_refused = [a for i, a in enumerate(answers) if i % 2 == 0 and a[0] != 200]
            assert len(small_ok) == int(usd_to_micros(KEY_LIMIT_USD) // COST_MICROS) == 4
            assert all(a[0] == 200 for i, a in enumerate(answers) if i % 2 == 1)
            for status, body, rid in small_refused:
                assert status == 429, body
                assert (body["error"]["type"], body["error"]["code"]) == ("insufficient_quota", "budget_exceeded")
                assert f"key {small['id']!r} of app 'team-a'" in body["error"]["message"] and rid
            assert (await chat(http, tap, other["key"]))[0] == 200

            # Either worker answers; each knows the other's spend once the collector recorded it.
            report = await until(lambda: get_budget(http, tap, small["key"]),
                                 lambda r: r["budgets"][1]["spent_usd"] * 1e6 == 4 * COST_MICROS)
            assert report["key_id"] == small["id"]
            assert [(b["key_id"], b["period"], b["exceeded"]) for b in report["budgets"]] == [
                (None, "monthly", False), (small["id"], "daily", False)]
            assert [b["key_id"] for b in (await get_budget(http, tap, other["key"]))["budgets"]] == [None]

            # Rotation: the successor keeps the key's budget and its spend (the same lineage).
            status, rotated = await tap.call("POST", f"/v1/apps/team-a/keys/{small['id']}/rotate", {"overlap_s": 60})
            assert status == 201 and rotated["issued"]["lineage_id"] == small["id"]
            successor = rotated["issued"]
            await tap.wait_version(6)
            status, body, _ = await chat(http, tap, successor["key"])
            assert status == 429 and body["error"]["code"] == "budget_exceeded", body
            status, listed = await until(lambda: tap.call("GET", f"/v1/apps/team-a/keys/{successor['id']}/budgets"),
                                         lambda r: r[1]["spend"]["budgets"][1]["spent_usd"] * 1e6 == 4 * COST_MICROS)
            assert [b["settings"]["key_id"] for b in listed["data"]] == [small["id"]]
            assert listed["spend"]["key_id"] == small["id"]
            code, out = await asyncio.to_thread(cli, tap, "budgets", "get", "team-a", "--key", successor["id"])
            assert code == 0 and f"spend key {small['id']} * daily" in out, out
            # A file key is named by its hash's first 12 hex digits.
            assert (await chat(http, tap, APP_KEY))[0] == 200

            # The ledger equals the events, per key, to the micro-USD (18 admitted: 4 + 13 + the file key's 1).
            ledger = await ledger_per_key(budget_store_settings, expected_rows=18)
            events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=10**6, wait_s=5))
            per_key: Counter[str] = Counter()
            for request in events.values():
                usage = request.get("budget_usage")
                if usage is not None:
                    assert isinstance(usage, BudgetUsage) and usage.cost_micros is not None
                    assert usage.key_id is not None
                    per_key[usage.key_id] += usage.cost_micros
            file_key = default_key_id(hash_key(APP_KEY))
            assert file_key.startswith("sha256:") and len(file_key) == 19
            assert per_key == {small["id"]: 4 * COST_MICROS, other["id"]: 13 * COST_MICROS, file_key: COST_MICROS}
            assert ledger == {k: (v, v // COST_MICROS) for k, v in per_key.items()}
            refusals = [r["proxy_log"] for r in events.values() if r["proxy_log"].status_code == 429]
            assert len(refusals) == len(small_refused) + 1
            assert {log.key_id for log in refusals} == {small["id"]}  # the refusals name the key too
            async with await open_store(budget_store_settings, migrate=False) as store:
                today = period_start("daily", datetime.now(UTC))
                spend = await store.spend("team-a", None, "daily", today, small["id"])
                assert (spend.cost_micros, spend.requests) == (4 * COST_MICROS, 4)

            # gateway-tap status lists the key's budget with its spend.
            config = parse_config(document)
            report_lines = (await gather_status(config)).budgets
            [line] = [b for b in report_lines if b.key_id is not None]
            assert (line.app_id, line.key_id, line.period) == ("team-a", small["id"], "daily")
            assert line.spent_usd * 1e6 == 4 * COST_MICROS and line.used_pct >= 90

            code, out = await asyncio.to_thread(cli, tap, "budgets", "delete", "team-a", "--key", successor["id"],
                                                "--period", "daily")
            assert code == 0, out
            await tap.wait_version(7)
            assert (await chat(http, tap, successor["key"]))[0] == 200
            code, out = await asyncio.to_thread(cli, tap, "budgets", "get", "team-a", "--json")
            assert [b["settings"].get("key_id") for b in json.loads(out)["data"]] == [None]
        assert await asyncio.to_thread(collector.stop) == 0, collector.log_tail()
    finally:
        collector.stop()


async def until(read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], limit_s: float = 30) -> Any:
    """``read()`` again until ``done`` says yes (``limit_s`` only bounds a hang)."""
    async with asyncio.timeout(limit_s):
        while not done(value := await read()):  # noqa: ASYNC110 - polling other processes, no event to wait on
            await asyncio.sleep(0.1)
    return value


async def ledger_per_key(settings: BudgetStoreSettings, expected_rows: int) -> dict[str, tuple[int, int]]:
    """``{key_id: (cost_micros, rows)}`` of the ledger, once the collector recorded ``expected_rows``."""
    db = await connect(settings, migrate=False)
    try:
        async with asyncio.timeout(60):
            while True:
                async with db.transaction(write=False) as tx:
                    rows = await tx.fetch("SELECT key_id, SUM(cost_micros), COUNT(*) FROM budget_ledger "
                                          "GROUP BY key_id")
                if sum(int(r[2]) for r in rows) >= expected_rows:
                    return {r[0]: (int(r[1]), int(r[2])) for r in rows}
                await asyncio.sleep(0.1)
    finally:
        await db.close()
