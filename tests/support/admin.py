"""Helpers of the admin API tests: a tap served by ``gateway-tap serve --workers 2`` with the admin API on,
its state in the given budget store, and a small client of the API."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiokafka import AIOKafkaConsumer

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.settings import BudgetStoreSettings
from schemas import control_topic
from tests.support.tap import UPSTREAM_SECRET, metrics_url, tap_config

ADMIN_TOKEN = "gt-admin-token-for-tests-0123456789"
ADMIN_TOKEN_ENV = "GATEWAY_TAP_TEST_ADMIN_TOKEN"


@dataclass
class AdminTap:
    url: str
    admin_url: str
    proc: ManagedProcess
    document: dict[str, Any]
    log_path: Path

    @property
    def metrics_url(self) -> str:
        return metrics_url(self.document)

    async def call(self, method: str, path: str, body: Any = None, **params: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.request(
                method, self.admin_url + path, json=body, params=params or None,
                headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
            return resp.status, (await resp.json() if resp.status != 204 else None)

    async def wait_version(self, version: int, workers: int = 2, timeout_s: float = 30.0) -> float:
        """Seconds until every worker reports ``version`` (polled every 20 ms)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            _, status = await self.call("GET", "/v1/status")
            runs = [t["version"] for t in status["taps"] if t["gateway_id"] == self.document["gateway_id"]]
            if len(runs) >= workers and min(runs) >= version:
                return time.monotonic() - start
            await asyncio.sleep(0.02)
        raise AssertionError(f"workers did not all report version {version}: {status}")


def admin_document(mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
                   store: BudgetStoreSettings, **kwargs: Any) -> dict[str, Any]:
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", port=free_port(),
                          **kwargs)
    document["gateway_id"] = f"tap-{topic_prefix}"
    document["tap"]["access_log"] = False
    document["tap"]["admin"] = {"listen": {"host": "127.0.0.1", "port": free_port()},
                                "tokens": [{"id": "ops", "token_env": ADMIN_TOKEN_ENV}]}
    document["budget_store"] = store.model_dump()
    document["budget_enforcement"] = {"staleness_s": 0.2}
    return document


@asynccontextmanager
async def admin_tap(document: dict[str, Any], tmp_path: Path, workers: int = 2,
                    env: dict[str, str] | None = None) -> AsyncIterator[AdminTap]:
    """``gateway-tap serve`` of ``document`` with the admin token in its environment (``env`` adds to it)."""
    path = tmp_path / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    port = document["tap"]["listen"]["port"]
    admin_port = document["tap"]["admin"]["listen"]["port"]
    log_path = tmp_path / "tap.log"
    proc = ManagedProcess("tap", cli_argv("serve", "--config", str(path), "--workers", str(workers)),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                          env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET, ADMIN_TOKEN_ENV: ADMIN_TOKEN, **(env or {})},
                          log_path=log_path, start_timeout=60, stop_signal=signal.SIGTERM, stop_timeout=60)
    await asyncio.to_thread(proc.start)
    try:
        yield AdminTap(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", proc, document, log_path)
    finally:
        await asyncio.to_thread(proc.stop)


async def audit_records(bootstrap: str, prefix: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` admin audit records on the control topic (control message envelopes)."""
    consumer = AIOKafkaConsumer(control_topic(prefix), bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    found: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(60):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        assert record.value is not None
                        message = orjson.loads(record.value)
                        if message["kind"] == "admin.audit":
                            found.append(message)
    finally:
        await consumer.stop()
    return found
