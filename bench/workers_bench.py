"""Why a second tap worker raises CPU per request: this 2-core machine, or the tap's own code?

In one run, the full tap (demo config, 3 example plugins, budgets, events) with 1 and with 2 workers, each
measured twice at the same concurrency:

* ``shared``: nothing pinned, as ``tap_bench`` runs it: the workers, wrk, the mock upstream and the broker
  share both cores;
* ``pinned``: the tap's processes (every thread) on core 1, wrk, the mock and the broker on core 0. Two
  workers then share one core between themselves only: what is left of the growth is what two workers cost
  in our code (multiprocess metrics, two publishers, two budget refreshes...), the rest was the machine.

Before the load, the tap's CPU with no traffic is measured too (``--idle-s``): the clock-driven work (timers,
pollers, the Kafka client's threads) that a second worker doubles and that fewer requests per worker share.

CPU per request is the user + system CPU of the tap's processes divided by the requests served. The part our
code adds per request with two workers can also be counted, load-independently, in instructions:
``python -m bench.tap_instructions --variants plugins,plugins+multiproc`` (each worker of ``tap.workers > 1``
keeps its metrics in mmap'd files).

    .venv/bin/python -m bench.workers_bench [--concurrency 16] [--duration 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import psutil

from bench.tap_bench import ROOT, VARIANTS, Bench, Result, cpu_seconds, tap_config, wrk
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok


def pin(pid: int, cpus: str) -> None:
    """Every thread of ``pid`` and of its children onto ``cpus`` (taskset syntax)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(proc.pid)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=10.0, help="CPU measured with no traffic this long.")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two cores")
    rows: dict[tuple[str, int], list[Result]] = {}
    idle_pct: dict[int, float] = {}
    with Bench(args.duration, [args.concurrency], 1.0) as bench:
        assert bench.mock.pid is not None and bench.noida.process is not None
        broker_pid, mock_pid = bench.noida.process.pid, bench.mock.pid
        for workers in (1, 2):
            port = free_port()
            config = tap_config(bench.tmp / f"w{workers}", bench.mock_url, bench.noida.bootstrap, port, workers,
                                VARIANTS["plugins"], f"workers{workers}")
            argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(ROOT), "--config",
                    str(config), "--workers", str(workers)]
            tap = ManagedProcess(f"tap-{workers}", argv, ready=lambda p=port: http_ok(f"http://127.0.0.1:{p}/readyz"),
                                 log_path=bench.tmp / f"tap-{workers}.log", stop_signal=15, stop_timeout=30).start()
            try:
                assert tap.pid is not None
                time.sleep(2.0)  # every worker up (readyz answers once the first one is)
                url = f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions"
                wrk(url, args.concurrency, 2, bench.plain, None)  # warm-up
                time.sleep(1.0)
                before, started = cpu_seconds(tap.pid), time.monotonic()
                time.sleep(args.idle_s)  # no traffic: what the workers burn by the clock
                idle_pct[workers] = 100 * (cpu_seconds(tap.pid) - before) / (time.monotonic() - started)
                print(f"idle    {workers}w cpu={idle_pct[workers]:.1f}% of a core", flush=True)
                for round_ in range(args.rounds):
                    for mode in (("shared", "pinned") if round_ % 2 == 0 else ("pinned", "shared")):
                        everything = "0-1"
                        pin(tap.pid, "1" if mode == "pinned" else everything)
                        for pid in (broker_pid, mock_pid):
                            pin(pid, "0" if mode == "pinned" else everything)
                        before = cpu_seconds(tap.pid)
                        r = wrk(url, args.concurrency, args.duration, bench.plain, "0" if mode == "pinned" else None)
                        r.cpu_us = (cpu_seconds(tap.pid) - before) / max(1.0, r.rps * args.duration) * 1e6
                        rows.setdefault((mode, workers), []).append(r)
                        print(f"{mode:<7} {workers}w c={args.concurrency} rps={r.rps:7.0f} p50={r.p50_ms:6.2f} "
                              f"p99={r.p99_ms:7.2f} cpu={r.cpu_us:5.0f}us load={psutil.getloadavg()[0]:.1f}",
                              flush=True)
            finally:
                tap.stop()
    print()
    print(f"`python -m bench.workers_bench {' '.join(sys.argv[1:])}` ({time.strftime('%Y-%m-%d')}): full tap, "
          f"c={args.concurrency}, {args.rounds} runs of {args.duration} s per cell (median), CPU µs per request of "
          "the tap's processes")
    print()
    print("| placement | 1 worker: CPU µs/req | RPS | 2 workers: CPU µs/req | RPS | growth |")
    print("|---|---|---|---|---|---|")
    for mode, label in (("shared", "nothing pinned (as tap_bench)"),
                        ("pinned", "tap on core 1; wrk, mock, broker on core 0")):
        one = statistics.median(r.cpu_us for r in rows[(mode, 1)])
        two = statistics.median(r.cpu_us for r in rows[(mode, 2)])
        rps1 = statistics.median(r.rps for r in rows[(mode, 1)])
        rps2 = statistics.median(r.rps for r in rows[(mode, 2)])
        print(f"| {label} | {one:,.0f} | {rps1:,.0f} | {two:,.0f} | {rps2:,.0f} | {(two - one) / one:+.0%} |")
    print()
    print("With no traffic (" + ", ".join(f"{w} worker{'s' if w > 1 else ''}: {p:.1f}% of a core"
                                        for w, p in sorted(idle_pct.items())) +
          "): charged to requests, that is the clock-driven work per request at the rates above, e.g. "
          + ", ".join(f"{w}w shared {_per_request_us(idle_pct[w], rows[('shared', w)])} µs"
                      for w in sorted(idle_pct)) + ".")


def _per_request_us(idle_pct: float, results: list[Result]) -> str:
    return f"{idle_pct / 100 / statistics.median(r.rps for r in results) * 1e6:,.0f}"


if __name__ == "__main__":
    main()
