"""What the garbage collector does to the tap under load, read from the tap's own metrics.

Runs the full tap (``plugins`` variant of ``bench.tap_bench``, 1 worker) of this checkout and of ``--before`` (e.g.
a worktree with ``tune_gc()`` taken out of ``gateway_tap/proxy/server.py``), one after the other, each under wrk at
``--concurrency`` for ``--seconds``, and reads from its ``/metrics`` what that window added to
``gateway_tap_gc_pause_seconds`` (collections and their total length, by generation) and to
``gateway_tap_event_loop_lag_seconds`` (how many of the loop's 100 ms samples were late by more than 5, 10 and
25 ms). Rounds alternate the two checkouts.

    .venv/bin/python -m bench.gc_pause_bench --before /tmp/nogc [--concurrency 16] [--seconds 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.tap_bench import ROOT, VARIANTS, Bench, tap_config, wrk
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok


def scrape(port: int) -> dict[str, float]:
    """The counters this bench compares, as ``name{labels}`` -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name not in ("gateway_tap_gc_pause_seconds", "gateway_tap_event_loop_lag_seconds"):
            continue
        for s in family.samples:
            if s.name.endswith(("_count", "_sum")) or (s.name.endswith("_bucket") and s.labels.get("le") in
                                                        ("0.005", "0.01", "0.025", "+Inf")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k in ("generation", "le"))
                key = f"{s.name}{{{labels}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


def start(bench: Bench, root: Path, name: str) -> tuple[ManagedProcess, str, int]:
    port, metrics_port = free_port(), free_port()
    config = tap_config(bench.tmp / name, bench.mock_url, bench.noida.bootstrap, port, 1, VARIANTS["plugins"],
                        f"gc{name}", root)
    document = yaml.safe_load(config.read_text())
    document["tap"]["metrics"] = {"port": metrics_port}
    config.write_text(yaml.safe_dump(document))
    argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(root), "--config", str(config),
            "--workers", "1"]
    tap = ManagedProcess(f"tap-{name}", argv, ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                         log_path=bench.tmp / f"{name}.log", stop_signal=15, stop_timeout=30).start()
    return tap, f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions", metrics_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    roots = {"before": args.before.resolve(), "after": ROOT}
    totals: dict[str, dict[str, float]] = {v: {} for v in roots}
    served: Counter[str] = Counter()
    p99: dict[str, list[float]] = {v: [] for v in roots}
    with Bench(args.seconds, [args.concurrency], 1.0) as bench:
        started = {v: start(bench, root, v) for v, root in roots.items()}
        try:
            for _, url, _ in started.values():
                wrk(url, args.concurrency, 3, bench.plain)  # warm-up
            for round_ in range(args.rounds):
                for version in (list(roots) if round_ % 2 == 0 else list(roots)[::-1]):
                    _, url, metrics_port = started[version]
                    before = scrape(metrics_port)
                    r = wrk(url, args.concurrency, args.seconds, bench.plain)
                    for key, value in scrape(metrics_port).items():
                        totals[version][key] = totals[version].get(key, 0.0) + value - before.get(key, 0.0)
                    served[version] += int(r.rps * args.seconds)
                    p99[version].append(r.p99_ms)
                    print(f"{version:<6} rps={r.rps:7.0f} p50={r.p50_ms:6.2f} p99={r.p99_ms:6.2f}", flush=True)
        finally:
            for tap, _, _ in started.values():
                tap.stop()
    print(f"\n`python -m bench.gc_pause_bench --before {args.before} --concurrency {args.concurrency} --seconds "
          f"{args.seconds} --rounds {args.rounds}`: full tap, 1 worker; before = {args.before}, after = this "
          "checkout\n")
    print("| | before | after |\n|---|---:|---:|")
    print("| requests | " + " | ".join(f"{served[v]:,}" for v in roots) + " |")
    print("| wrk p99 per run (ms) | " + " | ".join(", ".join(f"{x:.1f}" for x in p99[v]) for v in roots) + " |")
    for gen in ("0", "1", "2"):
        count = f"gateway_tap_gc_pause_seconds_count{{generation={gen}}}"
        total = f"gateway_tap_gc_pause_seconds_sum{{generation={gen}}}"
        n = {v: totals[v].get(count, 0.0) for v in roots}
        t = {v: totals[v].get(total, 0.0) for v in roots}
        print(f"| generation {gen} collections | " + " | ".join(f"{n[v]:,.0f}" for v in roots) + " |")
        print(f"| generation {gen}: pause µs per request | "
              + " | ".join(f"{t[v] / max(1, served[v]) * 1e6:.1f}" for v in roots) + " |")
        print(f"| generation {gen}: mean pause ms | "
              + " | ".join(f"{t[v] / max(1.0, n[v]) * 1e3:.2f}" for v in roots) + " |")
    lag = "gateway_tap_event_loop_lag_seconds_bucket"
    for le, label in (("0.005", "5"), ("0.01", "10"), ("0.025", "25")):
        print(f"| loop lag samples > {label} ms (of all) | " + " | ".join(
            f"{totals[v].get(f'{lag}{{le=+Inf}}', 0.0) - totals[v].get(f'{lag}{{le={le}}}', 0.0):,.0f} of "
            f"{totals[v].get(f'{lag}{{le=+Inf}}', 0.0):,.0f}" for v in roots) + " |")


if __name__ == "__main__":
    main()
