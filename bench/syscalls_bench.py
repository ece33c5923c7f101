"""System calls per request: the bare proxy vs tap variants, counted by ``strace -c`` under the same wrk load.

Instructions per request (``bench/tap_instructions.py``) count user space only; the kernel's share of CPU per
request follows the system calls a server makes (reads, writes, ``epoll`` wake-ups, timers). This attaches
``strace -f -c`` to one server process (every thread) for ``--seconds`` while wrk drives it at ``--concurrency``,
and divides each call's count by the requests wrk completed in that window. strace slows the traced process
several-fold, so the counts per request are the figure here, not its time or rate.

    .venv/bin/python -m bench.syscalls_bench [--variants base,plugins] [--concurrency 16] [--seconds 6]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench.tap_bench import ROOT, VARIANTS, Bench, _serving, wrk
from gateway_tap.dev.servers import ManagedProcess, free_port

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def traced(pid: int, url: str, concurrency: int, seconds: int, script: Path) -> tuple[Counter[str], float]:
    """Calls by name per request of ``pid``'s threads while wrk runs ``seconds``."""
    load: dict[str, float] = {}

    def drive() -> None:
        load["rps"] = wrk(url, concurrency, seconds + 2, script).rps

    driver = threading.Thread(target=drive)
    driver.start()
    out = subprocess.run(["timeout", "-s", "INT", str(seconds), "strace", "-f", "-c", "-p", str(pid)],
                         capture_output=True, text=True).stderr
    driver.join()
    calls: Counter[str] = Counter()
    for line in out.splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] += int(m.group(1))
    return calls, load["rps"] * (seconds + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="base,plugins")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=6)
    args = parser.parse_args()
    rows: dict[str, tuple[Counter[str], float]] = {}
    with Bench(args.seconds, [args.concurrency], 1.0) as bench:
        port = free_port()
        bare = ManagedProcess("bare", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), "--upstream",
                                       bench.mock_url, "--port", str(port), "--workers", "1"],
                              ready=lambda: _serving(port), log_path=bench.tmp / "bare.log", stop_signal=15).start()
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            wrk(url, args.concurrency, 2, bench.plain)
            assert bare.pid is not None
            rows["bare"] = traced(bare.pid, url, args.concurrency, args.seconds, bench.plain)
        finally:
            bare.stop()
        for name in args.variants.split(","):
            tap, base = bench.start_tap(VARIANTS[name], 1, ROOT, "after")
            try:
                url = base + "/llm/openai/v1/chat/completions"
                wrk(url, args.concurrency, 2, bench.plain)
                assert tap.pid is not None
                rows[name] = traced(tap.pid, url, args.concurrency, args.seconds, bench.plain)
            finally:
                tap.stop()
    names = sorted({c for calls, _ in rows.values() for c in calls},
                   key=lambda c: -max(calls[c] / max(1.0, n) for calls, n in rows.values()))
    print(f"`python -m bench.syscalls_bench --variants {args.variants} --concurrency {args.concurrency} "
          f"--seconds {args.seconds}`: system calls per request (strace -f -c, one worker)\n")
    print("| call | " + " | ".join(rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for call in names:
        cells = [f"{calls[call] / max(1.0, n):.2f}" for calls, n in rows.values()]
        if any(float(c) >= 0.05 for c in cells):
            print(f"| {call} | " + " | ".join(cells) + " |")
    print("| **all** | " + " | ".join(f"**{sum(calls.values()) / max(1.0, n):.2f}**" for calls, n in rows.values())
          + " |")


if __name__ == "__main__":
    main()
