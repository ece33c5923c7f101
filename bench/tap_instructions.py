"""Instructions per request of the tap, counted by callgrind: a figure the machine's load does not move.

CPU time per request (``bench/tap_bench.py``) is the product's number, but on a shared 2-core machine it
moves by 10-30% between runs, more than a small change costs. This bench runs one tap worker of each
checkout under ``valgrind --tool=callgrind`` with instrumentation off, warms it up, switches instrumentation
on (``callgrind_control -i on``) for exactly ``--requests`` sequential requests (c=1, the same body as
tap_bench), switches it off and reads the instructions executed in that window (every thread of the worker:
event loop, Kafka client threads). The count is repeatable to well under 1% whatever else the machine does.

    .venv/bin/python -m bench.tap_instructions --roots ../before,. [--variants base,plugins] [--requests 300]

Instructions are not time (a cache miss or a syscall costs more than its instruction count), so this is the
figure for "did this change add work on the request path"; tap_bench stays the figure for CPU per request.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.tap_bench import APP_KEY, BODY, ROOT, VARIANTS, Bench, Variant, _describe, tap_config
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok

WARMUP_REQUESTS = 50


def post(url: str) -> None:
    request = urllib.request.Request(url, data=BODY.encode(), method="POST", headers={
        "content-type": "application/json", "authorization": f"Bearer {APP_KEY}"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url}: {resp.status}")


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


def measure(bench: Bench, variant: Variant | None, root: Path, requests: int, tmp: Path, seq: int) -> float:
    """Instructions per request of one tap worker of ``root`` running ``variant`` (None: the bare proxy)."""
    port = free_port()
    work = tmp / f"{variant.name if variant else 'bare'}-{seq}"
    work.mkdir(parents=True, exist_ok=True)
    out_file = work / "callgrind.out"
    base = f"http://127.0.0.1:{port}"
    if variant is None:
        server = [str(ROOT / "bench" / "bare_proxy.py"), "--upstream", bench.mock_url, "--port", str(port)]
        url, ready = f"{base}/v1/chat/completions", lambda: _listening(port)
    else:
        config = tap_config(work, bench.mock_url, bench.noida.bootstrap, port, 1, variant, f"instr{seq}", root)
        server = [str(ROOT / "bench" / "tap_worker.py"), "--root", str(root), "--config", str(config),
                  *(() if variant.events else ("--no-events",))]
        url, ready = f"{base}/llm/openai/v1/chat/completions", lambda: http_ok(f"{base}/readyz")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}",
            sys.executable, *server]
    tap = ManagedProcess(f"instr{seq}", argv, ready=ready, log_path=work / "server.log", start_timeout=600,
                         stop_signal=15, stop_timeout=120).start()
    try:
        assert tap.proc is not None
        for _ in range(WARMUP_REQUESTS):
            post(url)
        subprocess.run(["callgrind_control", "-i", "on", str(tap.proc.pid)], check=True, capture_output=True)
        for _ in range(requests):
            post(url)
        subprocess.run(["callgrind_control", "-i", "off", str(tap.proc.pid)], check=True, capture_output=True)
    finally:
        tap.stop()
    deadline = time.monotonic() + 60
    while not out_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    return instructions(out_file) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", default=".", help="Comma-separated checkouts, measured in this order.")
    parser.add_argument("--variants", default="base,plugins",
                        help=f"Tap variants: {', '.join(VARIANTS)}; 'bare' is the bare aiohttp proxy (measured once).")
    parser.add_argument("--requests", type=int, default=300, help="Requests counted per checkout and variant.")
    parser.add_argument("--keep", type=Path, help="Keep the callgrind files here (for callgrind_annotate).")
    args = parser.parse_args()
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    variants = [None if name == "bare" else VARIANTS[name] for name in args.variants.split(",")]
    rows: dict[str, list[float]] = {}
    with Bench(1, [1], 1.0) as bench, tempfile.TemporaryDirectory(prefix="tap-instr-") as scratch:
        tmp = args.keep.resolve() if args.keep else Path(scratch)
        seq = 0
        for variant in variants:
            for root in roots[:1] if variant is None else roots:
                seq += 1
                per_request = measure(bench, variant, root, args.requests, tmp, seq)
                name = variant.name if variant is not None else "bare"
                rows.setdefault(name, []).append(per_request)
                print(f"{name} {root}: {per_request:,.0f} instructions/request", flush=True)
    print()
    print(f"`python -m bench.tap_instructions {' '.join(sys.argv[1:])}`: instructions per request (callgrind, "
          f"{args.requests} sequential requests after {WARMUP_REQUESTS} of warm-up, one worker, every thread)")
    print()
    print("| variant | " + " | ".join(f"{i + 1}: {_describe(r)}" for i, r in enumerate(roots)) + " |")
    print("|---|" + "---|" * len(roots))
    for name, values in rows.items():
        first = values[0]
        cells = [f"{v:,.0f}" + ("" if i == 0 else f" ({(v - first) / first:+.1%})") for i, v in enumerate(values)]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
