"""Instructions per request of the tap, counted by callgrind: a figure the machine's load does not move.

CPU time per request (``bench/tap_bench.py``) is the product's number, but on a shared 2-core machine it
moves by 10-30% between runs, more than a small change costs. This bench runs one tap worker of each
checkout under ``valgrind --tool=callgrind`` with instrumentation off, warms it up, switches instrumentation
on (``callgrind_control -i on``) for exactly ``--requests`` requests (``--concurrency`` keep-alive
connections, default 1; the same body as tap_bench), then counts an idle window of the same length, and
reports (requests - idle) / requests, every thread of the worker (event loop, Kafka client threads) included.
Subtracting the idle window keeps what runs by the clock (pollers, refresh loops, timers), which valgrind's ~50x
slowness would inflate per request, out of the per-request figure; it is reported apart, per second. Repeated
runs agree within a few percent.

    .venv/bin/python -m bench.tap_instructions --roots ../before,. [--variants base,plugins] [--requests 300]

Instructions are not time (a cache miss or a syscall costs more than its instruction count), so this is the
figure for "did this change add work on the request path"; tap_bench stays the figure for CPU per request.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.admin_bench import ADMIN_TOKEN, MANAGED_APPS, _admin_call
from bench.tap_bench import APP_KEY, BODY, ROOT, VARIANTS, Bench, Variant, _describe, tap_config
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok

WARMUP_REQUESTS = 50


def post_many(url: str, count: int, concurrency: int) -> None:
    """``count`` POSTs over ``concurrency`` keep-alive connections (as wrk sends them), each sequential."""
    parts = urllib.parse.urlsplit(url)

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        try:
            for _ in range(n):
                conn.request("POST", parts.path, body=BODY.encode(), headers={
                    "content-type": "application/json", "authorization": f"Bearer {APP_KEY}"})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: {resp.status}")
        finally:
            conn.close()

    shares = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, shares))


@dataclass(frozen=True)
class Measure:
    per_request: float
    """Instructions per request: the request window minus an idle window of the same length."""
    idle_per_s: float
    """Instructions per second with no requests (timers, pollers): valgrind's slowness inflates these per
    request, so they are measured apart."""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def instructions(out_file: Path) -> int:
    """Total instructions (Ir) in a callgrind output file (its ``totals:`` or ``summary:`` line)."""
    text = out_file.read_text(errors="replace")
    found = re.findall(r"^(?:totals|summary):\s+(\d+)", text, re.M)
    if not found:
        raise RuntimeError(f"no totals in {out_file}")
    return int(found[-1])


def measure(bench: Bench, variant: Variant | None, root: Path, requests: int, tmp: Path, seq: int,
            admin: bool = False, concurrency: int = 1, multiproc: bool = False) -> Measure:
    """Instructions per request of one tap worker of ``root`` running ``variant`` (None: the bare proxy);
    ``admin``: with the admin API on (listener up, :data:`MANAGED_APPS` API-managed apps with a key each, the
    version row polled as configured); ``multiproc``: with ``PROMETHEUS_MULTIPROC_DIR`` set, as every worker of
    ``tap.workers > 1`` runs (metric values in mmap'd files)."""
    port = free_port()
    admin_port = free_port()
    work = tmp / f"{variant.name if variant else 'bare'}{'-admin' if admin else ''}-{seq}"
    work.mkdir(parents=True, exist_ok=True)
    env = {}
    if multiproc:
        (work / "prometheus").mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(work / "prometheus")
    out_file = work / "callgrind.out"
    base = f"http://127.0.0.1:{port}"
    if variant is None:
        server = [str(ROOT / "bench" / "bare_proxy.py"), "--upstream", bench.mock_url, "--port", str(port)]
        url, ready = f"{base}/v1/chat/completions", lambda: _listening(port)
    else:
        config = tap_config(work, bench.mock_url, bench.noida.bootstrap, port, 1, variant, f"instr{seq}", root,
                            bench.redis.url)
        if admin:
            document = yaml.safe_load(config.read_text())
            document["tap"]["admin"] = {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": [
                {"id": "bench", "token_hash": "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]}
            config.write_text(yaml.safe_dump(document))
        server = [str(ROOT / "bench" / "tap_worker.py"), "--root", str(root), "--config", str(config),
                  *(() if variant.events else ("--no-events",))]
        url, ready = f"{base}/llm/openai/v1/chat/completions", lambda: http_ok(f"{base}/readyz")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
            sys.executable, *server]
    tap = ManagedProcess(f"instr{seq}", argv, ready=ready, log_path=work / "server.log", start_timeout=600,
                         stop_signal=15, stop_timeout=120, env=env).start()
    try:
        assert tap.proc is not None
        if admin:
            for i in range(MANAGED_APPS):
                _admin_call(f"http://127.0.0.1:{admin_port}", "POST", "/v1/apps",
                            {"id": f"managed-{i}", "allowed_llms": ["*"]})
                _admin_call(f"http://127.0.0.1:{admin_port}", "POST", f"/v1/apps/managed-{i}/keys")
        post_many(url, WARMUP_REQUESTS, concurrency)
        pid = str(tap.proc.pid)
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        started = time.monotonic()
        post_many(url, requests, concurrency)
        window_s = time.monotonic() - started
        subprocess.run(["callgrind_control", "-d", "requests", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-z", pid], check=True, capture_output=True)
        # The same time again without requests: what runs by the clock (pollers, refresh loops, the Kafka
        # client's own timers) and would otherwise be charged to the requests, inflated by valgrind's slowness.
        time.sleep(window_s)
        subprocess.run(["callgrind_control", "-d", "idle", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
    finally:
        tap.stop()
    dumps = sorted(work.glob(out_file.name + "*"), key=lambda p: p.stat().st_mtime)
    parts = {m.group(1): instructions(p) for p in dumps
             if (m := re.search(r"^desc: Trigger: dump (\w+)\s*$", p.read_text(errors="replace"), re.M))}
    if set(parts) != {"requests", "idle"}:
        raise RuntimeError(f"callgrind dumps not found in {work}: {[p.name for p in dumps]}")
    return Measure((parts["requests"] - parts["idle"]) / requests, parts["idle"] / window_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", default=".", help="Comma-separated checkouts, measured in this order.")
    parser.add_argument("--variants", default="base,plugins",
                        help=f"Tap variants: {', '.join(VARIANTS)}; 'bare' is the bare aiohttp proxy (measured once); "
                             "'<variant>+admin' runs the variant with the admin API on, '<variant>+multiproc' with "
                             "multiprocess metrics (as each worker of tap.workers > 1).")
    parser.add_argument("--requests", type=int, default=300, help="Requests counted per checkout and variant.")
    parser.add_argument("--concurrency", type=int, default=1, help="Keep-alive connections sending at once.")
    parser.add_argument("--keep", type=Path, help="Keep the callgrind files here (for callgrind_annotate).")
    args = parser.parse_args()
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    names = args.variants.split(",")
    rows: dict[str, list[Measure]] = {}
    with Bench(1, [1], 1.0) as bench, tempfile.TemporaryDirectory(prefix="tap-instr-") as scratch:
        tmp = args.keep.resolve() if args.keep else Path(scratch)
        seq = 0
        for name in names:
            base_name, *options = name.split("+")
            variant = None if base_name == "bare" else VARIANTS[base_name]
            for root in roots[:1] if variant is None else roots:
                seq += 1
                m = measure(bench, variant, root, args.requests, tmp, seq, "admin" in options, args.concurrency,
                            "multiproc" in options)
                rows.setdefault(name, []).append(m)
                print(f"{name} {root}: {m.per_request:,.0f} instructions/request, idle {m.idle_per_s:,.0f}/s",
                      flush=True)
    print()
    print(f"`python -m bench.tap_instructions {' '.join(sys.argv[1:])}`: instructions per request (callgrind, "
          f"{args.requests} requests over {args.concurrency} keep-alive connection(s) after {WARMUP_REQUESTS} "
          "of warm-up, one worker, every thread, minus "
          "an idle window of the same length; the idle instructions per second in brackets)")
    print()
    print("| variant | " + " | ".join(f"{i + 1}: {_describe(r)}" for i, r in enumerate(roots)) + " |")
    print("|---|" + "---|" * len(roots))
    for name, values in rows.items():
        first = values[0].per_request
        cells = [f"{v.per_request:,.0f}" + ("" if i == 0 else f" ({(v.per_request - first) / first:+.1%})")
                 + f" [{v.idle_per_s:,.0f}/s]" for i, v in enumerate(values)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
