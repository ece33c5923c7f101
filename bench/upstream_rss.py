"""Tap worker memory while an upstream misbehaves: the RSS must stay bounded by ``llms[].limits``.

1. the tests' hostile upstream (``tests/support/hostile_upstream.py``) in this process, and a private noida-db
   (Kafka) for the tap's events;
2. ``gateway-tap serve`` (one worker) in a child process, LLM ``openai`` on that upstream with the default
   limits (32 MiB whole answers, 256 MiB streams, 8 MiB events) and 600 s timeouts;
3. each scenario, on a fresh worker, sends ``--concurrency`` requests at once and samples the worker's RSS every
   20 ms: the RSS before, the peak while the answers run, and each answer's status and duration.

Scenarios: a 300 MiB body (with Content-Length), a gzip bomb (400 MiB of zeros, ~400 KB on the wire), the same
as deflate, an endless body, an endless gzip body, an endless event stream, an endless gzip event stream, one
endless event. ``--before PATH`` runs the worker a second time importing an older checkout (``PYTHONPATH``);
a worker whose RSS passes ``--kill-mib`` is killed (the older code has no cap: an endless body grows without
end) and the scenario reported as killed.

Usage::

    .venv/bin/python bench/upstream_rss.py [--concurrency 4] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway_tap.dev.servers import ManagedProcess, NoidaServer, cli_argv, free_port, http_ok
from tests.support.hostile_upstream import HostileUpstream

MIB = 1024 * 1024
SCENARIOS: list[tuple[str, str, bool]] = [  # (name, x-hostile, stream requested)
    ("300 MiB body", f"big:{300 * MIB}", False),
    ("gzip bomb 400 MiB", f"gzip-bomb:{400 * MIB}", False),
    ("deflate bomb 400 MiB", f"deflate-bomb:{400 * MIB}", False),
    ("endless body", "endless", False),
    ("endless gzip body", "gzip-endless", False),
    ("endless stream", "endless-sse", True),
    ("endless gzip stream", "gzip-endless-sse", True),
    ("one endless event", "endless-event", True),
]
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
KEY = "gt-rss-bench-key-0123456789"


@dataclass
class Outcome:
    name: str
    base_mib: float
    peak_mib: float
    answers: list[tuple[int | str, int, float]] = field(default_factory=list)
    """(status or failure, body bytes received, seconds) of each request."""
    killed: bool = False

    def line(self) -> str:
        statuses = sorted({str(a[0]) for a in self.answers})
        slowest = max((a[2] for a in self.answers), default=0.0)
        received = max((a[1] for a in self.answers), default=0)
        return (f"| {self.name} | {self.base_mib:.0f} | {self.peak_mib:.0f} | {self.peak_mib - self.base_mib:+.0f} | "
                f"{'/'.join(statuses)}{' (worker killed)' if self.killed else ''} | {received / MIB:.1f} | "
                f"{slowest:.1f} |")


def tap_document(upstream_url: str, bootstrap: str, spool: Path, port: int) -> dict[str, object]:
    import hashlib

    return {
        "gateway_id": "rss-bench",
        "kafka": {"bootstrap_servers": bootstrap, "topic_prefix": "rssbench"},
        "tap": {"listen": {"host": "127.0.0.1", "port": port}, "access_log": False, "metrics": {"port": None},
                "publisher": {"spool_dir": str(spool)}},
        "llms": [{"id": "openai", "vendor": "openai", "upstream_url": upstream_url,
                  "timeouts": {"first_byte_s": 600, "total_s": 600}}],
        "apps": [{"id": "bench", "key_hashes": ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]}],
    }


async def _one(session: aiohttp.ClientSession, url: str, hostile: str, stream: bool,
               timeout_s: float) -> tuple[int | str, int, float]:
    started = time.monotonic()
    body = CHAT[:-1] + b',"stream":true}' if stream else CHAT
    received = 0
    try:
        async with asyncio.timeout(timeout_s), session.post(
                url, data=body, headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json",
                                         "x-hostile": hostile}) as resp:
            async for chunk in resp.content.iter_any():
                received += len(chunk)
            return resp.status, received, time.monotonic() - started
    except (TimeoutError, aiohttp.ClientError) as exc:
        return type(exc).__name__, received, time.monotonic() - started


async def run_scenario(tap_url: str, pid: int, scenario: tuple[str, str, bool], concurrency: int, *,
                       timeout_s: float = 120.0, kill_mib: float = 2048.0) -> Outcome:
    """One scenario against the worker ``pid`` serving ``tap_url``; see the module."""
    name, hostile, stream = scenario
    proc = psutil.Process(pid)
    url = f"{tap_url}/llm/openai/v1/chat/completions"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        base = proc.memory_info().rss / MIB
        outcome = Outcome(name, base, base)
        tasks = [asyncio.create_task(_one(session, url, hostile, stream, timeout_s)) for _ in range(concurrency)]
        while not all(t.done() for t in tasks):
            try:
                rss = proc.memory_info().rss / MIB
            except psutil.Error:
                break
            outcome.peak_mib = max(outcome.peak_mib, rss)
            if rss > kill_mib:
                proc.kill()
                outcome.killed = True
                break
            await asyncio.sleep(0.02)
        outcome.answers = list(await asyncio.gather(*tasks))
    return outcome


async def measure(bootstrap: str, work: Path, concurrency: int, pythonpath: str | None = None,
                  scenarios: list[tuple[str, str, bool]] | None = None, **kw: float) -> list[Outcome]:
    """Each scenario against a fresh tap worker (importing ``pythonpath`` when given) and one upstream."""
    outcomes: list[Outcome] = []
    async with HostileUpstream() as upstream:
        for scenario in SCENARIOS if scenarios is None else scenarios:
            port = free_port()
            config = work / "tap.yaml"
            config.write_text(yaml.safe_dump(tap_document(upstream.url, bootstrap, work / "spool", port)))
            env = {"PYTHONPATH": pythonpath} if pythonpath else {}
            # cwd: "python -m" puts it first on sys.path, where the repo would shadow PYTHONPATH's checkout.
            proc = ManagedProcess("tap", cli_argv("serve", "--config", str(config)), env=env, cwd=work,
                                  ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),  # noqa: B023
                                  log_path=work / "tap.log", start_timeout=60)
            await asyncio.to_thread(proc.start)
            try:
                assert proc.proc is not None
                await asyncio.sleep(1.0)  # start-up settled
                outcomes.append(await run_scenario(f"http://127.0.0.1:{port}", proc.proc.pid, scenario,
                                                   concurrency, **kw))
            finally:
                await asyncio.to_thread(proc.stop)
    return outcomes


TABLE_HEAD = ("| scenario | RSS before (MiB) | peak (MiB) | growth | answers | most bytes to a client (MiB) | "
              "slowest answer (s) |\n|---|---:|---:|---:|---|---:|---:|")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="upstream-rss-"))
    server = NoidaServer(data_dir=work / "noida", services=("kafka",), log_path=work / "noida.log").start()
    try:
        runs = [("after", None)] + ([("before", args.before)] if args.before else [])
        for label, path in runs:
            (work / label).mkdir()
            chosen = [s for s in SCENARIOS if not args.only or any(o in s[0] for o in args.only)]

            outcomes = await measure(server.bootstrap, work / label, args.concurrency, path,
                                     timeout_s=args.timeout_s, kill_mib=args.kill_mib, scenarios=chosen)
            print(f"\n{label} ({args.concurrency} requests at once per scenario, one worker)\n{TABLE_HEAD}")
            for outcome in outcomes:
                print(outcome.line(), flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up on one answer after this long")
    parser.add_argument("--kill-mib", type=float, default=2048.0, help="kill the worker above this RSS")
    parser.add_argument("--only", action="append", help="run the scenarios whose name contains this (repeatable)")
    parser.add_argument("--before", help="a checkout of the older code, measured the same way")
    return parser.parse_args()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parse_args()))
