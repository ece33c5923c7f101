"""Tap benchmark: where every microsecond of the tap's CPU goes, layer by layer, against its floor.

In one run, wrk (1 thread, POST of a small chat completion) against:

* ``direct``: the mock upstream itself;
* ``bare``: a bare aiohttp pass-through proxy (``bench/bare_proxy.py``: uvloop, one pooled
  ClientSession, streams the answer back): the floor of the tap's own stack;
* the tap with its layers switched on one at a time (``--variants``):

  - ``base``: no plugins, no budgets, no events (``bench/tap_worker.py --no-events``: ``Exchange.events``
    patched to return nothing, so no event is built, encoded or produced; the publisher idles);
  - ``events``: + the three events per request, published to a local noida-db broker (lz4, acks=all, idempotent);
  - ``budgets``: + the example budgets plus a hard daily budget on the bench app (so admission checks a hard
    limit), read back from a SQLite store every second. No budget collector runs (it would take half the
    machine's CPU from the tap); ``pending_ttl_s: 2`` stands in for it, so the ids of settled usages the
    refresh looks up stay as few as with a collector ~2 s behind, instead of growing all run long;
  - ``plugins``: + the three example plugins: the full tap of the demo ``gateway-tap.yaml``;
  - ``stream``: the full tap with streamed responses (SSE, 20 chunks: ``max_tokens`` 18 plus the role and
    stop chunks, ``--chunk-delay-ms`` apart so each chunk reaches the tap on its own, as tokens do);
    the ``bare`` row is repeated with the same streamed request;
  - ``cache``: the full tap + the response cache plugin (shared store, every request a hit), and hits
    vs misses of that cache with 20 ms of injected upstream latency;
  - ``ratelimit`` / ``ratelimit-shared``: ``base`` + requests, tokens and in-flight limits on the bench app (high
    enough that nothing is refused, so every request is counted and settled), counted in the worker
    (``mode: local``) or in a ``redis-server`` the bench starts (``mode: shared``: one Redis round trip per
    request, settlements pipelined); compare with ``base``. Only for checkouts that have rate limits;

* LiteLLM proxy 1.110.x in front of the same mock (``--skip-litellm`` to leave it out).

CPU per request is the user + system CPU of the server's processes (every worker; not wrk, not the mock)
divided by the requests served; the broker's CPU is a column of its own.
``--before CHECKOUT`` measures every tap variant for that checkout too (e.g. a worktree of main), cell by
cell next to the current one, so before/after come from the same run and the same load; ``--after CHECKOUT``
replaces the current one (e.g. one past commit against its parent).

    .venv/bin/python -m bench.tap_bench [--duration 6] [--concurrency 1,16,64] [--workers 1,2]
        [--variants base,events,budgets,plugins,stream,cache] [--before ../main] [--skip-litellm] [--write]

LiteLLM is installed by this script into ``bench/.venv-litellm`` (its ``proxy`` extra pins a
``litellm-proxy`` package that is not on PyPI, so the proxy's dependencies are installed one by one).
``--write`` replaces the "## Tap" section of BENCHMARKS.md with the results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

from gateway_tap.dev.servers import ManagedProcess, NoidaServer, RedisServer, free_port, http_ok, mock_llm_process
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
STREAM_CHUNKS = 20
STREAM_BODY = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello benchmark"}],'
               f'"max_tokens":{STREAM_CHUNKS - 2},"stream":true}}')
CACHE_PLUGIN = {"name": "response_cache", "use": "gateway_tap.examples.plugins.response_cache:ResponseCache",
                "order": 40, "kv": {"backend": "shared", "max_bytes": 16 * 1024 * 1024}, "config": {"ttl_s": 3600}}
# Budget admission against a hard limit is the path that matters; the example app "demo" only has a soft one.
HARD_BUDGET = {"app_id": "demo", "limit_usd": 1_000_000.0, "period": "daily", "mode": "hard"}
# No budget collector records usage in this bench: the tap forgets its settled usages after this long, as it
# would once a collector ~2 s behind recorded them (otherwise each refresh looks up every id of the run).
PENDING_TTL_S = 2.0
UPSTREAM_LATENCY_MS = 20
LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def lua(headers: dict[str, str], body: str = BODY) -> str:
    """The POST script with extra request headers."""
    head = (f"wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
            f"wrk.headers[\"Authorization\"] = \"Bearer {APP_KEY}\"\n")
    return head + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items()) + LUA_DONE


@dataclass(frozen=True)
class Variant:
    """One tap configuration: the layers switched on."""

    name: str
    label: str
    events: bool = True
    budgets: bool = True
    plugins: bool = True
    stream: bool = False
    cache: bool = False
    ratelimit: str | None = None  # rate_limiting.mode of the ratelimit variants


VARIANTS = {v.name: v for v in (
    Variant("base", "tap: no plugins, no budgets, no events", events=False, budgets=False, plugins=False),
    Variant("events", "+ events", budgets=False, plugins=False),
    Variant("budgets", "+ budgets", plugins=False),
    Variant("plugins", "+ 3 example plugins (full tap)"),
    Variant("stream", "full tap, streamed (SSE, 20 chunks)", stream=True),
    Variant("cache", "full tap + response cache (100% hits)", cache=True),
    Variant("ratelimit", "base + rate limits, local (requests, tokens, in flight)", events=False, budgets=False,
            plugins=False, ratelimit="local"),
    Variant("ratelimit-shared", "base + rate limits, shared (Redis)", events=False, budgets=False, plugins=False,
            ratelimit="shared"),
)}
# Limits no request of the bench reaches: every request is checked, counted and settled, none refused.
BENCH_RATE_LIMITS = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent": 10**6}
LAYERS = ("base", "events", "budgets", "plugins")  # each adds one layer to the one before


@dataclass
class Result:
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0  # CPU time (user + system) of the server's processes per request
    broker_us: float | None = None  # the broker's CPU per request (tap rows)


@dataclass
class Cell:
    """One measured row: a target at some worker count and concurrency."""

    target: str  # direct / bare / bare-stream / litellm / a variant name
    workers: int
    concurrency: int
    result: Result
    version: str = "after"  # "before" / "after" for tap variants


@dataclass
class CacheSaving:
    """The response cache at one concurrency with injected upstream latency: all hits vs all misses."""

    concurrency: int
    hits: Result
    misses: Result
    hit_ratio: float


@dataclass
class RunData:
    cells: list[Cell] = field(default_factory=list)
    rss: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cache: CacheSaving | None = None
    versions: dict[str, str] = field(default_factory=dict)
    rounds: int = 1

    def get(self, target: str, workers: int, concurrency: int, version: str = "after") -> Result | None:
        for cell in self.cells:
            if (cell.target, cell.workers, cell.concurrency, cell.version) == (target, workers, concurrency,
                                                                                version):
                return cell.result
        return None


def merge(results: list[Result]) -> Result:
    """Several runs of one cell as one: requests and CPU summed; latencies are the runs' mean percentiles."""
    if len(results) == 1:
        return results[0]
    n = len(results)
    served = [r.rps for r in results]  # every run lasts the same duration
    total = sum(served) or 1.0
    brokers = [r.broker_us for r in results if r.broker_us is not None]
    return Result(total / n, sum(r.p50_ms for r in results) / n, sum(r.p95_ms for r in results) / n,
                  sum(r.p99_ms for r in results) / n, sum(r.errors for r in results),
                  sum(r.cpu_us * s for r, s in zip(results, served, strict=True)) / total,
                  sum(b * s for b, s in zip(brokers, served, strict=False)) / total if brokers else None)


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


def wrk(url: str, concurrency: int, duration: int, script: Path, cpus: str | None = None) -> Result:
    """One wrk run (1 thread) of ``script``; ``cpus`` (taskset syntax) pins wrk to those cores."""
    prefix = ["taskset", "-c", cpus] if cpus is not None else []
    out = subprocess.run([*prefix, "wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "-s", str(script), url],
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

    def workers(self) -> list[float]:
        """Peak RSS of the serving processes (with several, the parent only supervises)."""
        if len(self.peak) == 1:
            return list(self.peak.values())
        return [mb for pid, mb in self.peak.items() if pid != self.root.pid]

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def demo_config_of(root: Path) -> Path:
    """The demo config of checkout ``root``: each version runs its own (keys and plugin paths moved over time)."""
    for candidate in (root / "gateway_tap" / "examples" / "gateway-tap.yaml", root / "examples" / "gateway-tap.yaml"):
        if candidate.exists():
            return candidate
    return DEMO_CONFIG


def cache_plugin_of(root: Path) -> dict[str, Any]:
    """:data:`CACHE_PLUGIN` with the response cache's module path in checkout ``root``."""
    for folder in ("gateway_tap/examples/plugins", "gateway_tap/plugins/examples"):
        if (root / folder / "response_cache.py").exists():
            return {**CACHE_PLUGIN, "use": folder.replace("/", ".") + ".response_cache:ResponseCache"}
    return CACHE_PLUGIN


def tap_config(tmp: Path, mock_url: str, bootstrap: str, port: int, workers: int, variant: Variant,
               prefix: str, root: Path = ROOT, redis_url: str | None = None) -> Path:
    """The demo ``gateway-tap.yaml`` of checkout ``root`` pointed at the bench's mock and broker, with
    ``variant``'s layers."""
    tmp.mkdir(parents=True, exist_ok=True)
    document = yaml.safe_load(demo_config_of(root).read_text())
    document["kafka"]["bootstrap_servers"] = bootstrap
    document["kafka"]["topic_prefix"] = prefix
    document["tap"].update({"listen": {"host": "127.0.0.1", "port": port}, "workers": workers,
                            "access_log": False, "shared_kv_path": str(tmp / "plugin-kv.sqlite")})
    if "metrics" in document["tap"]:  # a checkout with the metrics listener: off (no fixed port; not measured)
        document["tap"]["metrics"] = {"port": None}
    document["tap"]["publisher"]["spool_dir"] = str(tmp / "spool")
    for llm in document["llms"]:
        llm["upstream_url"] = mock_url
    document["apps"][0]["key_hashes"] = ["sha256:" + hashlib.sha256(APP_KEY.encode()).hexdigest()]
    document["budget_store"]["sqlite_path"] = str(tmp / "budgets.sqlite3")
    document["collectors"] = {}
    document["budgets"] = [*document["budgets"], HARD_BUDGET] if variant.budgets else []
    document["budget_enforcement"]["pending_ttl_s"] = PENDING_TTL_S
    if not variant.plugins:
        document["plugins"] = []
    if variant.cache:
        document["plugins"].append(cache_plugin_of(root))
    if variant.ratelimit is not None:
        document["rate_limits"] = [{"app_id": document["apps"][0]["id"], **BENCH_RATE_LIMITS}]
        document["rate_limiting"] = {"mode": variant.ratelimit}
        if variant.ratelimit == "shared":
            document["redis"] = {"url": redis_url, "key_prefix": f"{prefix}:"}
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


def cache_saving(url: str, stats_url: str, tmp: Path, concurrency: int, duration: int) -> CacheSaving:
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


class Bench:
    """Starts each target in turn, measures it at every concurrency, stops it."""

    def __init__(self, duration: int, levels: list[int], chunk_delay_ms: float, rounds: int = 2) -> None:
        self.duration = duration
        self.rounds = rounds
        self.levels = levels
        self.tmp = Path(tempfile.mkdtemp(prefix="tap-bench-"))
        self.data = RunData()
        self.plain = self.tmp / "post.lua"
        self.plain.write_text(lua({}))
        self.stream = self.tmp / "stream.lua"
        self.stream.write_text(lua({"x-mock-chunk-delay-ms": str(chunk_delay_ms)}, STREAM_BODY))
        self.noida = NoidaServer(self.tmp / "noida", services=("kafka",), log_path=self.tmp / "noida.log")
        self.redis = RedisServer(self.tmp / "redis", log_path=self.tmp / "redis.log")  # the shared rate limits'
        self.mock = mock_llm_process(log_path=self.tmp / "mock.log")
        self.mock_url = ""
        self._seq = 0

    def __enter__(self) -> Bench:
        self.noida.start()
        self.redis.start()
        self.mock.start()
        self.mock_url = f"http://127.0.0.1:{self.mock.env['GATEWAY_TAP_MOCK_PORT']}"
        self.data.load_start = psutil.getloadavg()
        return self

    def __exit__(self, *exc: object) -> None:
        self.mock.stop()
        self.redis.stop()
        self.noida.stop()
        self.data.load = psutil.getloadavg()

    def cell(self, target: str, workers: int, level: int, url: str, pid: int, script: Path,
             version: str) -> Result:
        """One wrk run; CPU of the server's process tree (and the broker's, for taps) per request."""
        broker = self.noida.process.pid if self.noida.process is not None else None
        before = cpu_seconds(pid)
        broker_before = cpu_seconds(broker) if broker else 0.0
        with RssSampler(pid) as sampler:
            r = wrk(url, level, self.duration, script)
        served = max(1.0, r.rps * self.duration)
        r.cpu_us = (cpu_seconds(pid) - before) / served * 1e6
        if target in VARIANTS and broker:
            r.broker_us = (cpu_seconds(broker) - broker_before) / served * 1e6
        key = f"{target} ({workers}w, {version})"
        peaks, prior = sorted(sampler.workers()), self.data.rss.get(key, [])
        self.data.rss[key] = peaks if sum(peaks) > sum(prior) else prior
        print(f"{target:<12} {version:<6} {workers}w c={level:<3} rps={r.rps:8.0f} p50={r.p50_ms:6.2f} "
              f"p99={r.p99_ms:7.2f} err={r.errors} cpu={r.cpu_us:6.0f}us broker={r.broker_us or 0:5.0f}us "
              f"load={psutil.getloadavg()[0]:.1f}", flush=True)
        return r

    def measure(self, target: str, workers: int, runs: dict[str, tuple[str, int]], script: Path) -> None:
        """Every level for each version in ``runs`` (version -> (url, pid)); with several versions their cells
        alternate (A B, then B A in the next round), so slow swings of the machine's load hit both alike."""
        for url, _ in runs.values():
            wrk(url, 16, 2, script)  # warm-up: connections, caches, lazy imports
        versions = list(runs)
        for level in self.levels:
            results: dict[str, list[Result]] = {v: [] for v in versions}
            for round_ in range(self.rounds):
                for version in (versions if round_ % 2 == 0 else versions[::-1]):
                    url, pid = runs[version]
                    results[version].append(self.cell(target, workers, level, url, pid, script, version))
            for version, rs in results.items():
                self.data.cells.append(Cell(target, workers, level, merge(rs), version))

    def direct(self) -> None:
        assert self.mock.pid is not None
        self.measure("direct", 1, {"after": (f"{self.mock_url}/v1/chat/completions", self.mock.pid)}, self.plain)

    def bare(self, workers: int, stream: bool = False) -> None:
        port = free_port()
        proc = ManagedProcess(f"bare-{workers}", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"),
                                                  "--upstream", self.mock_url, "--port", str(port),
                                                  "--workers", str(workers)],
                              ready=lambda: _serving(port), log_path=self.tmp / f"bare-{workers}.log",
                              stop_signal=15).start()
        try:
            assert proc.pid is not None
            self.measure("bare-stream" if stream else "bare", workers,
                         {"after": (f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)},
                         self.stream if stream else self.plain)
        finally:
            proc.stop()

    def start_tap(self, variant: Variant, workers: int, root: Path, version: str) -> tuple[ManagedProcess, str]:
        self._seq += 1
        port = free_port()
        prefix = f"bench{self._seq}"
        tmp = self.tmp / f"{variant.name}-{workers}w-{version}"
        config = tap_config(tmp, self.mock_url, self.noida.bootstrap, port, workers, variant, prefix, root,
                            self.redis.url)
        argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(root), "--config", str(config),
                "--workers", str(workers), *(() if variant.events else ("--no-events",))]
        tap = ManagedProcess(f"tap-{prefix}", argv, ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                             log_path=tmp / "tap.log", stop_signal=15, stop_timeout=30).start()
        return tap, f"http://127.0.0.1:{port}"

    def taps(self, variant: Variant, workers: int, roots: dict[str, Path], cache_saving_too: bool) -> None:
        """The variant for every version in ``roots`` (version -> checkout), all running, measured interleaved."""
        started: dict[str, tuple[ManagedProcess, str]] = {}
        try:
            for version, root in roots.items():
                started[version] = self.start_tap(variant, workers, root, version)
            runs = {version: (base + "/llm/openai/v1/chat/completions", tap.pid or 0)
                    for version, (tap, base) in started.items()}
            self.measure(variant.name, workers, runs, self.stream if variant.stream else self.plain)
            if cache_saving_too:
                base = started["after"][1]
                self.data.cache = cache_saving(base + "/llm/openai/v1/chat/completions",
                                               base + "/plugins/response_cache/stats", self.tmp,
                                               16 if 16 in self.levels else self.levels[-1], self.duration)
                print("cache", self.data.cache, flush=True)
        finally:
            for tap, _ in started.values():
                tap.stop()

    def litellm(self, workers: int) -> None:
        exe = ensure_litellm()
        if exe is None:
            self.data.notes.append("LiteLLM could not be installed (see stderr); its rows are missing.")
            return
        port = free_port()
        proc = ManagedProcess(
            "litellm", [str(exe), "--config", str(litellm_config(self.tmp, self.mock_url)), "--host", "127.0.0.1",
                        "--port", str(port), "--num_workers", str(workers)],
            ready=lambda: http_ok(f"http://127.0.0.1:{port}/health/liveliness"),
            env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"},  # no network fetch at start-up
            log_path=self.tmp / "litellm.log", start_timeout=180, stop_timeout=20).start()
        try:
            assert proc.pid is not None
            self.measure("litellm", workers, {"after": (f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)},
                         self.plain)
        finally:
            proc.stop()


def _serving(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)  # any HTTP answer will do
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def run(duration: int, levels: list[int], workers: list[int], variants: list[Variant], before: Path | None,
        with_litellm: bool, chunk_delay_ms: float, rounds: int, after: Path = ROOT) -> RunData:
    with Bench(duration, levels, chunk_delay_ms, rounds) as bench:
        bench.data.versions = {"after": _describe(after)} | ({"before": _describe(before)} if before else {})
        bench.data.rounds = rounds
        bench.direct()
        streamed = any(v.stream for v in variants)
        for count in workers:
            bench.bare(count)
            if streamed:
                bench.bare(count, stream=True)
            roots = {"before": before, "after": after} if before is not None else {"after": after}
            for variant in variants:
                bench.taps(variant, count, roots, variant.cache and count == workers[0])
        if with_litellm:
            bench.litellm(max(workers))
        return bench.data


def _describe(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                         check=False).stdout.strip()
    return f"`{root}` at {out}" if out else f"`{root}`"


def _us(r: Result | None) -> str:
    return f"{r.cpu_us:,.0f}" if r is not None else "n/a"


def markdown(data: RunData, duration: int, command: str, chunk_delay_ms: float) -> str:
    compare = "before" in data.versions
    workers = sorted({c.workers for c in data.cells if c.target not in ("direct", "litellm")})
    levels = sorted({c.concurrency for c in data.cells})
    variants = [v for v in VARIANTS.values() if any(c.target == v.name for c in data.cells)]
    lines = [
        "## Tap", "",
        f"`{command}` ({time.strftime('%Y-%m-%d')}): wrk (1 thread, {data.rounds} runs of {duration} s per cell, "
        "POST of a small chat completion) against the mock upstream directly, a bare aiohttp pass-through proxy "
        "(`bench/bare_proxy.py`, the floor of the tap's stack), the tap with its layers switched on one at a "
        "time, and LiteLLM proxy 1.110.x, all in front of the same mock. CPU µs/request = user + system CPU "
        "of the server's processes (every worker; not wrk, not the mock, not the broker) / requests served: "
        "the stable figure on this shared machine, where RPS and latencies move by up to 2x between runs. "
        "Everything (wrk, mock, broker, proxy) shares the same 2 cores; load average "
        f"{data.load_start[0]:.1f} at the start, {data.load[0]:.1f} at the end (other engineers' work included).",
        "",
        "Layers: **base** = no plugins, no budgets, no events (bench launcher `bench/tap_worker.py --no-events`: "
        "`Exchange.events` returns nothing, so no event is built, encoded or produced); **+ events** = the three "
        "events per request to a local noida-db broker (acks=all, idempotent); **+ budgets** = the example budgets "
        f"plus a hard daily budget on the bench app, SQLite store (no budget collector runs: `pending_ttl_s: "
        f"{PENDING_TTL_S:g}` keeps the refresh's pending ids as few as a collector would); "
        "**+ plugins** = the three example plugins: the full tap of the demo `gateway-tap.yaml` (access log off); "
        f"**stream** = the full tap with SSE responses of {STREAM_CHUNKS} chunks, {chunk_delay_ms:g} ms apart "
        "(the bare row beside it streams the same).",
    ]
    if compare:
        lines += ["", f"Before = {data.versions['before']}; after = {data.versions['after']}. Both versions of "
                  "a variant run side by side and their runs alternate (before, after, then after, before), so "
                  "the machine's load swings hit both alike."]
    for count in workers:
        lines += ["", f"**CPU µs per request, {count} worker{'s' if count > 1 else ''}**" +
                  (" (before → after)" if compare else ""), "",
                  "| target | " + " | ".join(f"c={c}" for c in levels) + " | vs bare at c=16 |",
                  "|---|" + "---|" * (len(levels) + 1)]
        bare16 = data.get("bare", count, 16)
        for target, label in [("bare", "bare aiohttp proxy (floor)"), ("bare-stream", "bare proxy, streamed"),
                              *[(v.name, v.label) for v in variants]]:
            row = []
            for level in levels:
                after = data.get(target, count, level)
                prior = data.get(target, count, level, "before")
                row.append(f"{_us(prior)} → {_us(after)}" if prior is not None else _us(after))
            if all(x == "n/a" for x in row):
                continue
            after16 = data.get(target, count, 16)
            floor = data.get("bare-stream", count, 16) if target in ("stream", "bare-stream") else bare16
            ratio = "" if after16 is None or floor is None else f"{after16.cpu_us / floor.cpu_us:.1f}x"
            prior16 = data.get(target, count, 16, "before")
            if prior16 is not None and floor is not None:
                ratio = f"{prior16.cpu_us / floor.cpu_us:.1f}x → {ratio}"
            lines.append(f"| {label} | " + " | ".join(row) + f" | {ratio} |")
    lines += latency_and_targets(data, workers, levels, variants)
    layer_rows = [name for name in LAYERS if any(v.name == name for v in variants)]
    if len(layer_rows) > 1:
        lines += ["", "**What each layer adds** (CPU µs per request, difference to the row above it; "
                  "the base row is the difference to the bare proxy)" +
                  (", before → after" if compare else ""), "",
                  "| layer | " + " | ".join(f"{w}w c={c}" for w in workers for c in levels) + " |",
                  "|---|" + "---|" * (len(workers) * len(levels))]
        for i, name in enumerate(layer_rows):
            below = layer_rows[i - 1] if i > 0 else "bare"
            row = []
            for count in workers:
                for level in levels:
                    parts = []
                    for version in (["before", "after"] if compare else ["after"]):
                        top = data.get(name, count, level, version)
                        under = data.get(below, count, level, version if below != "bare" else "after")
                        parts.append(f"{top.cpu_us - under.cpu_us:+,.0f}" if top and under else "n/a")
                    row.append(" → ".join(parts))
            label = VARIANTS[name].label if name != "base" else "base tap over the bare proxy"
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        if "stream" in {v.name for v in variants} and "plugins" in layer_rows:
            row = []
            for count in workers:
                for level in levels:
                    parts = []
                    for version in (["before", "after"] if compare else ["after"]):
                        top = data.get("stream", count, level, version)
                        under = data.get("plugins", count, level, version)
                        parts.append(f"{top.cpu_us - under.cpu_us:+,.0f}" if top and under else "n/a")
                    row.append(" → ".join(parts))
            lines.append("| streamed instead of whole (full tap) | " + " | ".join(row) + " |")
    lines += ["", "All cells:", "",
              "| target | version | workers | c | RPS | p50 ms | p95 ms | p99 ms | errors | CPU µs/req | "
              "broker µs/req |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in data.cells:
        r = cell.result
        version = cell.version if cell.target in VARIANTS else ""
        lines.append(f"| {cell.target} | {version} | {cell.workers} | {cell.concurrency} | {r.rps:,.0f} | "
                     f"{r.p50_ms:.2f} | {r.p95_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | {r.cpu_us:,.0f} | "
                     f"{'' if r.broker_us is None else f'{r.broker_us:,.0f}'} |")
    direct1 = data.get("direct", 1, 1)
    full1 = data.get("plugins", 1, 1)
    if direct1 and full1:
        lines += ["", f"Added latency of the full tap (1 worker) over direct at c=1: p50 "
                  f"{full1.p50_ms - direct1.p50_ms:.2f} ms, p99 {full1.p99_ms - direct1.p99_ms:.2f} ms."]
    if data.cache is not None:
        hits, misses = data.cache.hits, data.cache.misses
        lines += ["", f"Response cache (full tap + `response_cache` on the shared SQLite store, 1 worker) with "
                  f"{UPSTREAM_LATENCY_MS} ms of injected upstream latency at concurrency {data.cache.concurrency}: "
                  f"hit ratio {data.cache.hit_ratio:.0%}; hits p50 {hits.p50_ms:.2f} ms / p99 {hits.p99_ms:.2f} ms "
                  f"at {hits.rps:,.0f} RPS vs misses (`cache-control: no-cache`: upstream call + store) p50 "
                  f"{misses.p50_ms:.2f} ms / p99 {misses.p99_ms:.2f} ms at {misses.rps:,.0f} RPS: a hit saves "
                  f"{misses.p50_ms - hits.p50_ms:.1f} ms at p50."]
    peaks = [f"{name}: " + ", ".join(f"{mb:.0f} MB" for mb in mbs) for name, mbs in data.rss.items()
             if name.startswith(("plugins", "stream")) and mbs]
    if peaks:
        lines += ["", "Peak RSS per worker under load: " + "; ".join(peaks) + "."]
    lines += data.notes
    return "\n".join(lines) + "\n"


def _ms(r: Result | None, attr: str) -> str:
    return f"{getattr(r, attr):.2f}" if r is not None else "n/a"


def latency_and_targets(data: RunData, workers: list[int], levels: list[int], variants: list[Variant]) -> list[str]:
    """The latency table per layer (p50 / p99 beside CPU) and the tail-latency targets, met or not."""
    lines: list[str] = []
    shown = [lv for lv in (1, 16) if lv in levels] or levels[:2]
    for count in workers:
        rows = [("bare", "bare aiohttp proxy (floor)"), *[(v.name, v.label) for v in variants if not v.stream
                                                           and not v.cache]]
        lines += ["", f"**Latency per layer, {count} worker{'s' if count > 1 else ''}** (ms; CPU µs per request at "
                  f"the highest concurrency shown)", "",
                  "| target | " + " | ".join(f"c={c} p50 | c={c} p99" for c in shown) + f" | CPU c={shown[-1]} |",
                  "|---|" + "---|" * (2 * len(shown) + 1)]
        for target, label in rows:
            for version in ("before", "after") if "before" in data.versions and target != "bare" else ("after",):
                cells = [data.get(target, count, c, version) for c in shown]
                if all(c is None for c in cells):
                    continue
                name = f"{label} ({version})" if "before" in data.versions and target != "bare" else label
                lines.append(f"| {name} | " + " | ".join(f"{_ms(c, 'p50_ms')} | {_ms(c, 'p99_ms')}" for c in cells)
                             + f" | {_us(cells[-1])} |")
    bare1, bare16 = data.get("bare", 1, 1), data.get("bare", 1, 16)
    full1, full16 = data.get("plugins", 1, 1), data.get("plugins", 1, 16)
    litellm_workers = max((c.workers for c in data.cells if c.target == "litellm"), default=None)
    targets: list[tuple[str, str, bool | None]] = []
    if bare16 and full16:
        ratio = full16.p99_ms / bare16.p99_ms
        targets.append(("p99 at c=16 <= 2x the bare proxy's", f"{full16.p99_ms:.2f} vs {bare16.p99_ms:.2f} ms = "
                        f"{ratio:.2f}x", ratio <= 2.0))
        cpu = full16.cpu_us / bare16.cpu_us
        targets.append(("CPU per request at c=16 <= 2.0x bare (stretch 1.5x)", f"{full16.cpu_us:,.0f} vs "
                        f"{bare16.cpu_us:,.0f} µs = {cpu:.2f}x" + (" (stretch met)" if cpu <= 1.5 else ""),
                        cpu <= 2.0))
    if bare1 and full1:
        added = full1.p99_ms - bare1.p99_ms
        targets.append(("p99 at c=1 <= bare + 1 ms", f"{full1.p99_ms:.2f} vs {bare1.p99_ms:.2f} ms = +{added:.2f} ms",
                        added <= 1.0))
    if litellm_workers is not None:
        tap = data.get("plugins", litellm_workers, 16)
        lite = data.get("litellm", litellm_workers, 16)
        if tap and lite:
            times = tap.rps / max(lite.rps, 1e-9)
            targets.append((f"RPS at c=16 >= 50x LiteLLM's ({litellm_workers} worker"
                            f"{'s' if litellm_workers > 1 else ''} each)",
                            f"{tap.rps:,.0f} vs {lite.rps:,.0f} = {times:.0f}x", times >= 50))
    if targets:
        lines += ["", "**Tail-latency targets** (full tap vs the bare proxy in this run, 1 worker)", "",
                  "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {'met' if ok else 'NOT met'} |" for name, value, ok in targets]
    return lines


def write_section(section: str) -> None:
    """Replace the BENCHMARKS.md section with ``section``'s own heading (its first line), or append it."""
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find("\n" + section.splitlines()[0] + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[: start + 1] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=4, help="Seconds per run of a cell.")
    parser.add_argument("--rounds", type=int, default=2,
                        help="Runs per cell; with --before the versions alternate A B / B A between rounds.")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--workers", default="1,2", help="Worker counts of the tap and the bare proxy.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Tap variants: {', '.join(VARIANTS)}.")
    parser.add_argument("--before", type=Path, help="A checkout of the old code: every tap variant runs for it too.")
    parser.add_argument("--after", type=Path, default=ROOT,
                        help="The checkout of the new code (default: this one), e.g. to measure one past commit "
                             "against its parent.")
    parser.add_argument("--chunk-delay-ms", type=float, default=1.0, help="Between streamed chunks (stream).")
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--write", action="store_true", help="Replace the '## Tap' section of BENCHMARKS.md.")
    args = parser.parse_args()
    names = [name for name in args.variants.split(",") if name]  # "" = only the direct, bare and LiteLLM rows
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    variants = [VARIANTS[name] for name in names]
    levels = [int(x) for x in args.concurrency.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    before = args.before.resolve() if args.before else None
    data = run(args.duration, levels, workers, variants, before, not args.skip_litellm, args.chunk_delay_ms,
               args.rounds, args.after.resolve())
    command = "python -m bench.tap_bench " + " ".join(sys.argv[1:])
    section = markdown(data, args.duration, command.strip(), args.chunk_delay_ms)
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
