"""CPU per request of a response-cache hit against a full proxied call, side by side in one run.

Three taps (one worker each, the example config's plugins, events to Kafka) on one mock LLM:

- ``proxied``: no cache, every request goes to the upstream;
- ``cache hit``: + ``response_cache`` on the shared SQLite store, every request a hit (served from the
  worker's in-process copy);
- ``cache hit, store only``: the same with ``local_max_entries: 0``, every hit read from the shared store
  (what a hit cost before the in-process copy).

Rounds interleave the targets so each comparison shares the machine's load; the figure is the tap
process's CPU time (user + system) per request, which a shared machine moves far less than RPS.
Target (issue 16): a hit costs <= 0.5x the CPU of a proxied call.

    python -m bench.cache_bench [--duration 5] [--concurrency 1,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from gateway_tap.dev.servers import ManagedProcess, NoidaServer, cli_argv, free_port, http_ok, mock_llm_process
from gateway_tap.examples import DEMO_CONFIG

ROOT = Path(__file__).resolve().parent.parent
APP_KEY = "sk-bench-6f1d2c9a8b7e4f3a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f"
BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello benchmark"}],"max_tokens":4}'
LUA = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {APP_KEY}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d\\n", summary.requests, summary.duration, latency:percentile(50),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
CACHE = {"name": "response_cache", "use": "gateway_tap.examples.plugins.response_cache:ResponseCache",
         "order": 40, "kv": {"backend": "shared", "max_bytes": 16 * 1024 * 1024}, "config": {"ttl_s": 3600}}
TARGETS: dict[str, dict[str, Any] | None] = {
    "proxied": None,
    "cache hit": CACHE,
    "cache hit, store only": {**CACHE, "config": {"ttl_s": 3600, "local_max_entries": 0}},
}


@dataclass
class Sample:
    rps: float
    p50_ms: float
    errors: int
    cpu_us: float


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wrk(url: str, concurrency: int, duration: int, script: Path) -> tuple[int, float, float, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    requests, duration_us, p50_us, errors = (int(x) for x in line.split()[1:])
    return requests, requests / (duration_us / 1e6), p50_us / 1000, errors


def tap_config(tmp: Path, mock_url: str, bootstrap: str, port: int, plugin: dict[str, Any] | None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load(DEMO_CONFIG.read_text())
    document["kafka"].update({"bootstrap_servers": bootstrap, "topic_prefix": "cachebench"})
    document["tap"].update({"listen": {"host": "127.0.0.1", "port": port}, "workers": 1, "access_log": False,
                            "metrics": {"port": None}})
    document["tap"]["publisher"]["spool_dir"] = str(tmp / "spool")
    for llm in document["llms"]:
        llm["upstream_url"] = mock_url
    document["apps"][0]["key_hashes"] = ["sha256:" + hashlib.sha256(APP_KEY.encode()).hexdigest()]
    if plugin is not None:
        document["plugins"].append(plugin)
    path = tmp / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run(duration: int, levels: list[int], rounds: int) -> dict[tuple[str, int], list[Sample]]:
    tmp = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    script = tmp / "post.lua"
    script.write_text(LUA)
    noida = NoidaServer(tmp / "noida", services=("kafka",), log_path=tmp / "noida.log").start()
    mock = mock_llm_process(log_path=tmp / "mock.log").start()
    mock_url = f"http://127.0.0.1:{mock.env['GATEWAY_TAP_MOCK_PORT']}"
    procs: list[ManagedProcess] = [mock]
    taps: dict[str, tuple[str, int]] = {}
    samples: dict[tuple[str, int], list[Sample]] = {}
    try:
        for i, (name, plugin) in enumerate(TARGETS.items()):
            port = free_port()
            config = tap_config(tmp / f"t{i}", mock_url, noida.bootstrap, port, plugin)
            tap = ManagedProcess(f"tap-{i}", cli_argv("serve", "--config", str(config)),
                                 ready=lambda port=port: http_ok(f"http://127.0.0.1:{port}/readyz"),  # type: ignore[misc]
                                 log_path=tmp / f"tap-{i}.log", stop_signal=15, stop_timeout=30).start()
            procs.append(tap)
            assert tap.pid is not None
            taps[name] = (f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions", tap.pid)
            wrk(taps[name][0], 16, 2, script)  # warm-up (and, for the caches, the one miss that stores)
        for _ in range(rounds):
            for level in levels:
                for name, (url, pid) in taps.items():
                    before = cpu_seconds(pid)
                    requests, rps, p50_ms, errors = wrk(url, level, duration, script)
                    cpu_us = (cpu_seconds(pid) - before) / max(1, requests) * 1e6
                    samples.setdefault((name, level), []).append(Sample(rps, p50_ms, errors, cpu_us))
                    print(f"{name:>22} c={level:<3} {rps:8.0f} rps  p50 {p50_ms:6.2f} ms  {cpu_us:7.0f} µs CPU/req"
                          f"  errors {errors}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
        noida.stop()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    load_before = psutil.getloadavg()
    samples = run(args.duration, levels, args.rounds)
    load_after = psutil.getloadavg()
    print(f"\nload average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}; {psutil.cpu_count()} CPUs")
    print("\nRatio = a target's CPU per request / the proxied call's in the same round (adjacent in time), median "
          "over rounds (min-max):\n")
    print("| concurrency | target | CPU µs/request, median (min-max) | vs proxied, same round | RPS (median) |")
    print("|---|---|---|---|---|")
    for level in levels:
        proxied = [s.cpu_us for s in samples[("proxied", level)]]
        for name in TARGETS:
            cpu = [s.cpu_us for s in samples[(name, level)]]
            ratios = [c / p for c, p in zip(cpu, proxied, strict=True)]
            rps = statistics.median(s.rps for s in samples[(name, level)])
            print(f"| {level} | {name} | {statistics.median(cpu):,.0f} ({min(cpu):,.0f}-{max(cpu):,.0f}) | "
                  f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | {rps:,.0f} |")

if __name__ == "__main__":
    main()
