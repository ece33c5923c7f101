"""Tap benchmark: wrk against (a) the mock upstream directly, (b) the tap in front of it with the three example
plugins and event publishing to a real (noida-db) broker, (c) LiteLLM proxy 1.110.x in front of the same mock,
(d) the tap with the response cache plugin added (shared store, every request a hit), and hits vs misses of
that cache with 20 ms of injected upstream latency.

    .venv/bin/python -m bench.tap_bench [--duration 10] [--concurrency 1,16,64] [--workers 1,2] [--write]

LiteLLM is installed by this script into ``bench/.venv-litellm`` (its ``proxy`` extra pins a
``litellm-proxy`` package that is not on PyPI, so the proxy's dependencies are installed one by one).
``--write`` replaces the "## Tap" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from gateway_tap.dev.servers import ManagedProcess, NoidaServer, cli_argv, free_port, http_ok, mock_llm_process
from gateway_tap.examples import DEMO_CONFIG

ROOT = Path(__file__).resolve().parent.parent
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_SPEC = "litellm>=1.110,<1.111"
# litellm[proxy] minus the unpublished litellm-proxy pin.
LITELLM_PROXY_DEPS = ["uvicorn", "fastapi", "starlette", "backoff", "rq", "apscheduler", "fastapi-sso", "pyjwt",
                      "python-multipart", "cryptography", "pynacl", "websockets>=15,<16", "gunicorn", "orjson",
                      "uvloop", "litellm-proxy-extras", "litellm-enterprise", "semver", "tomlkit", "rich<14",
                      "inquirerpy", "restrictedpython", "expression", "mcp", "soundfile", "polars"]
# One key for both proxies: the tap's app key and LiteLLM's master key (it refuses to start without a strong one).
APP_KEY = "sk-bench-6f1d2c9a8b7e4f3a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f"
BODY = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello benchmark"}],"max_tokens":4}'
CACHE_PLUGIN = {"name": "response_cache", "use": "gateway_tap.examples.plugins.response_cache:ResponseCache",
                "order": 40, "kv": {"backend": "shared", "max_bytes": 16 * 1024 * 1024}, "config": {"ttl_s": 3600}}
UPSTREAM_LATENCY_MS = 20
LUA_HEAD = f"""
wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {APP_KEY}"
"""
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""
LUA = LUA_HEAD + LUA_DONE


def lua(headers: dict[str, str]) -> str:
    """The POST script with extra request headers."""
    return LUA_HEAD + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()) + LUA_DONE


@dataclass
class Result:
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0  # CPU time (user + system) of the server's processes per request


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process tree (children that exited are not counted)."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def wrk(url: str, concurrency: int, duration: int, script: Path) -> Result:
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    requests, duration_us, p50, p95, p99, errors = (int(x) for x in line.split()[1:])
    return Result(requests / (duration_us / 1e6), p50 / 1000, p95 / 1000, p99 / 1000, errors)


def ensure_litellm() -> Path | None:
    """The ``litellm`` launcher in its own venv, installing it if needed; None (with a message) on failure."""
    exe = LITELLM_VENV / "bin" / "litellm"
    pip = [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
    try:
        if not (LITELLM_VENV / "bin" / "python").exists():
            subprocess.run([f"{sys.base_prefix}/bin/python3", "-m", "venv", str(LITELLM_VENV)], check=True)
        probe = [str(LITELLM_VENV / "bin" / "python"), "-c", "import litellm.proxy.proxy_server"]
        if subprocess.run(probe, capture_output=True, check=False).returncode != 0:
            subprocess.run([*pip, LITELLM_SPEC, *LITELLM_PROXY_DEPS], check=True)
        subprocess.run(probe, capture_output=True, check=True)
    except subprocess.CalledProcessError as exc:
        print(f"LiteLLM install failed: {exc}", file=sys.stderr)
        return None
    return exe


class RssSampler:
    """Peak RSS per process of a process tree while load runs."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            procs = [self.root, *self.root.children(recursive=True)]
            for proc in procs:
                try:
                    if "resource_tracker" in " ".join(proc.cmdline()):  # multiprocessing's helper, not a worker
                        continue
                    self.peak[proc.pid] = max(self.peak.get(proc.pid, 0.0), proc.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tap_config(tmp: Path, mock_url: str, bootstrap: str, port: int, workers: int, cache: bool = False) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load(DEMO_CONFIG.read_text())
    document["kafka"]["bootstrap_servers"] = bootstrap
    document["kafka"]["topic_prefix"] = "bench"
    document["tap"].update({"listen": {"host": "127.0.0.1", "port": port}, "workers": workers,
                            "access_log": False})
    document["tap"]["publisher"]["spool_dir"] = str(tmp / "spool")
    for llm in document["llms"]:
        llm["upstream_url"] = mock_url
    document["apps"][0]["key_hashes"] = ["sha256:" + hashlib.sha256(APP_KEY.encode()).hexdigest()]
    if cache:
        document["plugins"].append(CACHE_PLUGIN)
    path = tmp / "tap.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def litellm_config(tmp: Path, mock_url: str) -> Path:
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "gpt-4o-mini", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": f"{mock_url}/v1", "api_key": "sk-bench"}}],
        "litellm_settings": {"set_verbose": False, "drop_params": True},
        "general_settings": {"master_key": APP_KEY},
    }))
    return path


@dataclass
class CacheSaving:
    """The response cache at one concurrency with injected upstream latency: all hits vs all misses."""

    concurrency: int
    hits: Result
    misses: Result
    hit_ratio: float


def cache_saving(url: str, stats_url: str, tmp: Path, concurrency: int, duration: int) -> CacheSaving:
    import json
    import urllib.request

    def stats() -> dict[str, int]:
        request = urllib.request.Request(stats_url, headers={"Authorization": f"Bearer {APP_KEY}"})  # auth by default
        with urllib.request.urlopen(request, timeout=5) as resp:
            data: dict[str, int] = json.loads(resp.read())
            return data

    latency = {"x-mock-latency-ms": str(UPSTREAM_LATENCY_MS)}
    hits_script, misses_script = tmp / "hits.lua", tmp / "misses.lua"
    hits_script.write_text(lua(latency))
    # no-cache: never looked up, still stored: the full miss path (upstream call + store).
    misses_script.write_text(lua({**latency, "Cache-Control": "no-cache"}))
    misses = wrk(url, concurrency, duration, misses_script)
    before = stats()
    hits = wrk(url, concurrency, duration, hits_script)
    after = stats()
    served = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
    return CacheSaving(concurrency, hits, misses, (after["hits"] - before["hits"]) / max(1, served))


def run(duration: int, levels: list[int], workers: list[int], with_litellm: bool) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="tap-bench-"))
    script = tmp / "post.lua"
    script.write_text(LUA)
    results: dict[str, dict[int, Result]] = {}
    rss: dict[str, dict[int, float]] = {}
    notes: list[str] = []
    noida = NoidaServer(tmp / "noida", services=("kafka",), log_path=tmp / "noida.log").start()
    mock = mock_llm_process(log_path=tmp / "mock.log").start()
    mock_url = f"http://127.0.0.1:{mock.env['GATEWAY_TAP_MOCK_PORT']}"
    procs: list[ManagedProcess] = [mock]
    try:
        targets: list[tuple[str, str, ManagedProcess | None]] = [("direct", f"{mock_url}/v1/chat/completions", mock)]
        for count in workers:
            port = free_port()
            config = tap_config(tmp / f"w{count}", mock_url, noida.bootstrap, port, count)
            tap = ManagedProcess(f"tap-{count}", cli_argv("serve", "--config", str(config)),
                                 ready=lambda port=port: http_ok(f"http://127.0.0.1:{port}/readyz"),  # type: ignore[misc]
                                 log_path=tmp / f"tap-{count}.log", stop_signal=15, stop_timeout=30).start()
            procs.append(tap)
            targets.append((f"tap ({count}w)", f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions", tap))
        cport = free_port()
        config = tap_config(tmp / "cache", mock_url, noida.bootstrap, cport, 1, cache=True)
        cached = ManagedProcess("tap-cache", cli_argv("serve", "--config", str(config)),
                                ready=lambda: http_ok(f"http://127.0.0.1:{cport}/readyz"),
                                log_path=tmp / "tap-cache.log", stop_signal=15, stop_timeout=30).start()
        procs.append(cached)
        cache_url = f"http://127.0.0.1:{cport}/llm/openai/v1/chat/completions"
        targets.append(("tap + response cache (100% hits, 1w)", cache_url, cached))
        if with_litellm:
            exe = ensure_litellm()
            if exe is None:
                notes.append("LiteLLM could not be installed (see stderr); its column is missing.")
            else:
                lport = free_port()
                litellm = ManagedProcess(
                    "litellm", [str(exe), "--config", str(litellm_config(tmp, mock_url)), "--host", "127.0.0.1",
                                "--port", str(lport), "--num_workers", str(max(workers))],
                    ready=lambda: http_ok(f"http://127.0.0.1:{lport}/health/liveliness"),
                    env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},  # no network fetch at start-up
                    log_path=tmp / "litellm.log", start_timeout=180, stop_timeout=20).start()
                procs.append(litellm)
                targets.append((f"litellm ({max(workers)}w)", f"http://127.0.0.1:{lport}/v1/chat/completions", litellm))
        for name, url, proc in targets:
            wrk(url, 16, 2, script)  # warm-up: connections, caches, JIT-less but lazy imports
            results[name] = {}
            for level in levels:
                assert proc is not None and proc.pid is not None
                cpu_before = cpu_seconds(proc.pid)
                if name.startswith("tap"):
                    with RssSampler(proc.pid) as sampler:
                        results[name][level] = wrk(url, level, duration, script)
                    single = len(sampler.peak) == 1
                    for pid, mb in sampler.peak.items():
                        if single or pid != proc.pid:  # with workers > 1 the parent only supervises
                            rss.setdefault(name, {})[pid] = max(rss.get(name, {}).get(pid, 0.0), mb)
                else:
                    results[name][level] = wrk(url, level, duration, script)
                r = results[name][level]
                r.cpu_us = (cpu_seconds(proc.pid) - cpu_before) / max(1.0, r.rps * duration) * 1e6
                print(name, level, results[name][level], flush=True)
        saving = cache_saving(cache_url, f"http://127.0.0.1:{cport}/plugins/response_cache/stats", tmp,
                              16 if 16 in levels else levels[-1], duration)
        print("cache", saving, flush=True)
    finally:
        for proc in reversed(procs):
            proc.stop()
        noida.stop()
    return {"results": results, "rss": rss, "notes": notes, "load": psutil.getloadavg(), "cache": saving}


def markdown(data: dict[str, object], duration: int, command: str) -> str:
    results: dict[str, dict[int, Result]] = data["results"]  # type: ignore[assignment]
    rss: dict[str, dict[int, float]] = data["rss"]  # type: ignore[assignment]
    load = data["load"]
    lines = [
        "## Tap", "",
        f"`{command}`: wrk (1 thread, {duration} s per run, POST of a small chat completion) against (a) the mock "
        "upstream directly, (b) the tap (N worker processes, the three example plugins, "
        "events published to a local noida-db broker with the default publisher settings: gzip, acks=all, "
        "idempotent, access log off) and (c) LiteLLM proxy 1.110.2 (as many workers as the largest tap) in front of "
        "the same mock. "
        f"Measured {time.strftime('%Y-%m-%d')} on the 2-core development machine while other work ran "
        f"(load average {load[0]:.1f} at the end): the numbers are noisy, and everything (wrk, mock, broker, "  # type: ignore[index]
        "proxy) shares the same 2 cores.", "",
        "| target | concurrency | RPS | p50 ms | p95 ms | p99 ms | errors | server CPU µs/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_level in results.items():
        for level, r in by_level.items():
            lines.append(f"| {name} | {level} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | "
                         f"{r.errors} | {r.cpu_us:.0f} |")
    lite = next((by_level for name, by_level in results.items() if name.startswith("litellm")), {})
    lines += ["", "| tap | concurrency | added p50 ms | added p99 ms | RPS tap/direct | RPS tap/LiteLLM |",
              "|---|---|---|---|---|---|"]
    for name, by_level in results.items():
        if not name.startswith("tap"):
            continue
        for level, tap in by_level.items():
            direct = results["direct"][level]
            other = lite.get(level)
            ratio = f"{tap.rps / other.rps:.1f}x" if other else "n/a"
            lines.append(f"| {name} | {level} | {tap.p50_ms - direct.p50_ms:.2f} | {tap.p99_ms - direct.p99_ms:.2f} | "
                         f"{tap.rps / direct.rps:.0%} | {ratio} |")
    taps = [by_level for name, by_level in results.items() if name.startswith("tap")]
    if taps and 16 in taps[0] and 16 in results["direct"]:
        tap16, direct16 = taps[0][16], results["direct"][16]
        text = (f"Reading: RPS and latencies move by up to 2x between runs on this shared machine; server CPU per "
                f"request is the stable figure. At concurrency 16 the tap used {tap16.cpu_us / direct16.cpu_us:.0f}x "
                "the mock's CPU per request (aiohttp server and client, four hook calls, three events built, "
                "encoded and produced with gzip)")
        if 16 in lite:
            text += f", and LiteLLM {lite[16].cpu_us / tap16.cpu_us:.0f}x the tap's"
        text += (". With every process on the same two cores, RPS tap/direct is bounded by that CPU ratio, so the "
                 "direct mock (a trivial handler) is a much harder baseline than a real upstream.")
        lines += ["", text]
    saving: CacheSaving = data["cache"]  # type: ignore[assignment]
    hits, misses = saving.hits, saving.misses
    lines += ["", f"Response cache (tap, 1 worker, example plugins + `response_cache` on the shared SQLite store) "
              f"with {UPSTREAM_LATENCY_MS} ms of injected upstream latency at concurrency {saving.concurrency}: "
              f"hit ratio {saving.hit_ratio:.0%}; hits p50 {hits.p50_ms:.2f} ms / p99 {hits.p99_ms:.2f} ms at "
              f"{hits.rps:,.0f} RPS vs misses (`cache-control: no-cache`: upstream call + store) p50 "
              f"{misses.p50_ms:.2f} ms / p99 {misses.p99_ms:.2f} ms at {misses.rps:,.0f} RPS: a hit saves "
              f"{misses.p50_ms - hits.p50_ms:.1f} ms at p50."]
    for name, peaks in rss.items():
        lines += ["", f"{name} peak RSS under load per worker: " + ", ".join(f"{mb:.0f} MB" for mb in peaks.values())
                  + "."]
    lines += [f"{note}" for note in data["notes"]]  # type: ignore[attr-defined]
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("\n## Tap\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--workers", default="1,2", help="Tap worker counts to measure, comma-separated.")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--write", action="store_true", help="Replace the '## Tap' section of BENCHMARKS.md.")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    data = run(args.duration, levels, [int(x) for x in args.workers.split(",")], not args.skip_litellm)
    command = "python -m bench.tap_bench " + " ".join(sys.argv[1:])
    section = markdown(data, args.duration, command.strip())
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
