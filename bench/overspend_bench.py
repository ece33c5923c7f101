"""Overspend of a hard budget across taps: N tap processes x W workers on one PostgreSQL store, C concurrent
clients against a tiny hard budget, the budget collector paused on purpose (pipeline lag).

Per version (a checkout: ``--before ../main``, and this one):

1. a fresh PostgreSQL schema, event topics of their own, the mock upstream, noida-db for Kafka;
2. N taps (``bench/tap_worker.py --root CHECKOUT``: each version runs its own code) with one app and a hard
   daily ``limit_tokens`` budget; the budget collector starts and is paused (SIGSTOP) for ``--pause`` seconds
   as the load begins, then resumed (SIGCONT);
3. C clients send chat requests (40 characters and ``max_tokens`` 20: 30 tokens each, estimated exactly)
   round-robin over the taps for ``--duration`` seconds;
4. when the load stops, the collector records every event; the ledger is read back and compared with the
   budget_usage events on the topic (count, tokens and micro-USD must be equal).

Overspend = (tokens in the ledger - limit) / limit. The stated bound is docs/budgets.md's (0 here, with
estimates that never undershoot).

    .venv/bin/python -m bench.overspend_bench [--before ../main] [--taps 3] [--workers 2] [--clients 64]
        [--limit-tokens 2000] [--pause 30] [--duration 40] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway_tap.apps import hash_key
from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.dev.servers import (
    POSTGRES_DEFAULT_DSN,
    ManagedProcess,
    NoidaServer,
    cli_argv,
    ensure_postgres,
    free_port,
    http_ok,
    mock_llm_process,
)
from schemas import BudgetUsage, decode_event, topic_for

ROOT = Path(__file__).resolve().parent.parent
APP_KEY = "gt-overspend-bench-key-0123456789"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 20}
TOKENS_PER_REQUEST = 30  # the mock: 40 characters / 4 prompt tokens + max_tokens completion tokens
PRICE = {"input_per_1m": 0.15, "output_per_1m": 0.60}


@dataclass
class Result:
    version: str
    describe: str
    taps: int
    workers: int
    clients: int
    pause_s: float
    limit_tokens: int
    ok: int = 0
    refused: int = 0
    other: int = 0
    ledger_rows: int = 0
    ledger_tokens: int = 0
    ledger_micros: int = 0
    event_rows: int = 0
    event_tokens: int = 0
    event_micros: int = 0

    @property
    def overspend(self) -> float:
        return (self.ledger_tokens - self.limit_tokens) / self.limit_tokens

    @property
    def ledger_matches_events(self) -> bool:
        return (self.ledger_rows, self.ledger_tokens, self.ledger_micros) == (
            self.event_rows, self.event_tokens, self.event_micros)


def describe(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    return out.stdout.strip()[:80]


async def create_topics(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [topic_for(t, prefix) for t in ("proxy_log", "analytics", "budget_usage")]
        await admin.create_topics([NewTopic(n, 3, 1) for n in names] + [NewTopic(n + ".dlq", 1, 1) for n in names])
    finally:
        await admin.close()


def document(args: argparse.Namespace, mock: str, bootstrap: str, prefix: str, dsn: str, schema: str, index: int,
             port: int, tmp: Path) -> dict[str, Any]:
    return {
        "gateway_id": f"overspend-{index}",
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": prefix},
        "tap": {"listen": {"host": "127.0.0.1", "port": port}, "workers": args.workers, "access_log": False,
                "metrics": {"port": None},
                "publisher": {"spool_dir": str(tmp / f"spool-{index}"), "linger_ms": 5}},
        "llms": [{"id": "openai", "vendor": "openai", "upstream_url": mock, "prices": {"gpt-4o-mini": PRICE}}],
        "apps": [{"id": "capped", "key_hashes": [hash_key(APP_KEY)]}],
        "budgets": [{"app_id": "capped", "limit_tokens": args.limit_tokens, "period": "daily", "mode": "hard"}],
        "budget_store": {"backend": "postgres", "postgres_dsn": dsn, "postgres_schema": schema},
        "budget_enforcement": {"staleness_s": 1.0},
        "collectors": {"budget": {"group_instance_id": f"budget-{prefix}", "metrics": {"port": free_port()},
                                  "batch": {"max_events": 500, "max_wait_ms": 100}}},
    }


async def load(urls: list[str], clients: int, duration_s: float, result: Result) -> None:
    deadline = time.monotonic() + duration_s

    async def client(n: int) -> None:
        async with aiohttp.ClientSession() as http:
            i = n
            while time.monotonic() < deadline:
                url = urls[i % len(urls)]
                i += 1
                try:
                    async with http.post(url, json=BODY, headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
                        await resp.read()
                        if resp.status == 200:
                            result.ok += 1
                        elif resp.status == 429:
                            result.refused += 1
                            await asyncio.sleep(0.05)  # a refused client retries soon, as SDKs do (bounded here)
                        else:
                            result.other += 1
                except aiohttp.ClientError:
                    result.other += 1

    await asyncio.gather(*(client(n) for n in range(clients)))


async def read_usage(bootstrap: str, prefix: str, expect_at_least: int) -> list[BudgetUsage]:
    consumer = AIOKafkaConsumer(topic_for("budget_usage", prefix), bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    seen: dict[str, BudgetUsage] = {}
    idle_since = time.monotonic()
    try:
        while time.monotonic() - idle_since < 5 or len(seen) < expect_at_least:
            if time.monotonic() - idle_since > 60:
                break
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    assert record.value is not None
                    event = decode_event(record.value)
                    if isinstance(event, BudgetUsage):
                        seen[event.id] = event
                        idle_since = time.monotonic()
    finally:
        await consumer.stop()
    return list(seen.values())


async def ledger(dsn: str, schema: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(f'SELECT count(*), coalesce(sum(total_tokens), 0), coalesce(sum(cost_micros), 0) '
                                  f'FROM "{schema}".budget_ledger')
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])
    finally:
        await conn.close()


async def run_version(args: argparse.Namespace, version: str, root: Path, noida: NoidaServer, mock: str,
                      dsn: str, tmp: Path) -> Result:
    prefix = f"os{uuid.uuid4().hex[:8]}"
    schema = f"overspend_{prefix}"
    await create_topics(noida.bootstrap, prefix)
    result = Result(version, describe(root), args.taps, args.workers, args.clients, args.pause, args.limit_tokens)
    taps: list[ManagedProcess] = []
    urls = []
    configs = []
    for index in range(args.taps):
        port = free_port()
        doc = document(args, mock, noida.bootstrap, prefix, dsn, schema, index, port, tmp)
        path = tmp / f"{prefix}-tap-{index}.yaml"
        path.write_text(yaml.safe_dump(doc))
        configs.append(path)
        argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(root), "--config", str(path),
                "--workers", str(args.workers)]
        taps.append(ManagedProcess(f"tap-{index}", argv, ready=lambda p=port: http_ok(f"http://127.0.0.1:{p}/readyz"),
                                   log_path=tmp / f"{prefix}-tap-{index}.log", stop_signal=signal.SIGTERM,
                                   start_timeout=90, stop_timeout=60))
        urls.append(f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions")
    collector_port = yaml.safe_load(configs[0].read_text())["collectors"]["budget"]["metrics"]["port"]
    collector = ManagedProcess("collect-budget", [*cli_argv("collect", "budget", "--config", str(configs[0])),
                                                  "--log-level", "WARNING"],
                               ready=lambda: http_ok(f"http://127.0.0.1:{collector_port}/healthz"),
                               log_path=tmp / f"{prefix}-collector.log", stop_signal=signal.SIGTERM,
                               start_timeout=90, cwd=ROOT)
    try:
        collector.start()  # migrates the schema before the taps read it
        for tap in taps:
            await asyncio.to_thread(tap.start)
        assert collector.pid is not None
        os.killpg(collector.pid, signal.SIGSTOP)
        print(f"{version}: collector paused for {args.pause:.0f} s, load for {args.duration:.0f} s", flush=True)

        async def resume() -> None:
            await asyncio.sleep(args.pause)
            os.killpg(collector.pid or 0, signal.SIGCONT)
            print(f"{version}: collector resumed", flush=True)

        await asyncio.gather(load(urls, args.clients, args.duration, result), resume())
        for tap in taps:  # drained: every admitted request's event is on the topic
            await asyncio.to_thread(tap.stop)
        events = await read_usage(noida.bootstrap, prefix, result.ok)
        result.event_rows = len(events)
        result.event_tokens = sum(e.total_tokens for e in events)
        result.event_micros = sum(usd_to_micros(e.cost) for e in events)
        deadline = time.monotonic() + 120
        while True:
            rows, tokens, micros = await ledger(dsn, schema)
            if rows >= result.event_rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        result.ledger_rows, result.ledger_tokens, result.ledger_micros = rows, tokens, micros
    finally:
        if collector.pid is not None:
            os.killpg(collector.pid, signal.SIGCONT)
        collector.stop()
        for tap in taps:
            tap.stop()
    print(json.dumps(asdict(result) | {"overspend": result.overspend,
                                       "ledger_matches_events": result.ledger_matches_events}), flush=True)
    return result


def table(results: list[Result]) -> str:
    lines = ["| version | taps x workers | clients | collector paused | limit | admitted (tokens in the ledger) | "
             "refused (429) | overspend | stated bound | ledger = budget_usage events |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bound = "0 (docs/budgets.md)" if r.version == "after" else "none: grows with lag and taps"
        lines.append(f"| {r.version} | {r.taps} x {r.workers} | {r.clients} | {r.pause_s:.0f} s | {r.limit_tokens:,} "
                     f"| {r.ok:,} requests ({r.ledger_tokens:,} tokens) | {r.refused:,} | {r.overspend:.0%} | "
                     f"{bound} | {'yes' if r.ledger_matches_events else 'NO'} ({r.ledger_rows:,} rows, "
                     f"{r.ledger_micros:,} micro-USD) |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    ensure_postgres()
    tmp = Path(tempfile.mkdtemp(prefix="overspend-"))
    admin_dsn = os.environ.get("GATEWAY_TAP_TEST_PG", POSTGRES_DEFAULT_DSN)
    name = f"gateway_tap_overspend_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = admin_dsn.rpartition("/")[0] + "/" + name
    noida = NoidaServer(data_dir=tmp / "noida", services=("kafka",), log_path=tmp / "noida.log").start()
    mock = mock_llm_process(log_path=tmp / "mock.log").start()
    results: list[Result] = []
    try:
        mock_url = f"http://127.0.0.1:{mock.env['GATEWAY_TAP_MOCK_PORT']}"
        versions = ([("before", args.before)] if args.before else []) + ([] if args.only_before else [("after", ROOT)])
        for _ in range(args.runs):
            for version, root in versions:
                results.append(await run_version(args, version, root.resolve(), noida, mock_url, dsn, tmp))
    finally:
        mock.stop()
        noida.stop()
        admin = await asyncpg.connect(admin_dsn)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print()
    print(table(results))
    print(f"\nbefore = {describe(args.before) if args.before else '-'}; after = {describe(ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="A checkout of the old code, measured first.")
    parser.add_argument("--taps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--limit-tokens", type=int, default=2000)
    parser.add_argument("--pause", type=float, default=30.0, help="Seconds the budget collector is paused.")
    parser.add_argument("--duration", type=float, default=40.0, help="Seconds of load.")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only-before", action="store_true", help="Measure the --before checkout only.")
    args = parser.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
