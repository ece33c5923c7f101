"""Admin API bench: the proxy's CPU per request with the admin API on vs off, and what following the shared
state costs an idle worker.

1. The full tap of the demo config (three example plugins, budgets, events) twice, side by side: admin off,
   and admin on (``tap.admin.listen`` set, 20 API-managed apps with a key each, the version row polled every
   ``poll_interval_s``). wrk runs alternate between the two (A B / B A rounds, ``bench.tap_bench.Bench``);
   CPU per request is the user + system CPU of each tap's processes divided by the requests served.
2. Idle CPU: the same two taps with no traffic for ``--idle-s``; the difference is the cost of polling the
   version row (and the heartbeat), per worker, on SQLite and (with ``--pg DSN``) on PostgreSQL.

    .venv/bin/python -m bench.admin_bench [--duration 6] [--rounds 2] [--concurrency 16] [--workers 1,2]
        [--idle-s 20] [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--write]

``--write`` replaces the "## Admin API" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import urllib.request
import uuid

import psutil
import yaml

from bench.tap_bench import ROOT, VARIANTS, Bench, Cell, cpu_seconds, tap_config, write_section
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok

ADMIN_TOKEN = "bench-admin-token-0123456789"
MANAGED_APPS = 20


def _admin_call(url: str, method: str, path: str, body: object = None) -> object:
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read() or b"null")


def start(bench: Bench, workers: int, admin: bool, pg: str | None) -> tuple[ManagedProcess, str]:
    bench._seq += 1
    port = free_port()
    prefix = f"adminbench{bench._seq}"
    tmp = bench.tmp / f"{'on' if admin else 'off'}-{workers}w-{bench._seq}"
    path = tap_config(tmp, bench.mock_url, bench.noida.bootstrap, port, workers, VARIANTS["plugins"], prefix)
    document = yaml.safe_load(path.read_text())
    admin_port = free_port()
    if pg is not None:
        document["budget_store"] = {"backend": "postgres", "postgres_dsn": pg,
                                    "postgres_schema": f"bench_{uuid.uuid4().hex[:10]}"}
    if admin:
        document["tap"]["admin"] = {"listen": {"host": "127.0.0.1", "port": admin_port}, "tokens": [
            {"id": "bench", "token_hash": "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()}]}
    path.write_text(yaml.safe_dump(document))
    argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(ROOT), "--config", str(path),
            "--workers", str(workers)]
    tap = ManagedProcess(f"tap-{prefix}", argv, ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                         log_path=tmp / "tap.log", stop_signal=15, stop_timeout=30).start()
    if admin:
        admin_url = f"http://127.0.0.1:{admin_port}"
        for i in range(MANAGED_APPS):
            _admin_call(admin_url, "POST", "/v1/apps", {"id": f"managed-{i}", "allowed_llms": ["*"]})
            _admin_call(admin_url, "POST", f"/v1/apps/managed-{i}/keys")
    return tap, f"http://127.0.0.1:{port}"


def idle_cpu_ms_per_s(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {k: cpu_seconds(pid) for k, pid in pids.items()}
    time.sleep(seconds)
    return {k: (cpu_seconds(pid) - before[k]) * 1000 / seconds for k, pid in pids.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", default="16")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--pg", help="Also measure idle polling against this PostgreSQL DSN.")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    idle: list[tuple[str, int, dict[str, float]]] = []
    load_start = psutil.getloadavg()
    with Bench(args.duration, levels, 0.0, args.rounds) as bench:
        for workers in [int(x) for x in args.workers.split(",")]:
            taps = {"admin off": start(bench, workers, False, None), "admin on": start(bench, workers, True, None)}
            try:
                runs = {v: (base + "/llm/openai/v1/chat/completions", tap.pid or 0) for v, (tap, base) in taps.items()}
                bench.measure("full tap", workers, runs, bench.plain)
                idle.append(("sqlite", workers, idle_cpu_ms_per_s({v: t.pid or 0 for v, (t, _) in taps.items()},
                                                                   args.idle_s)))
            finally:
                for tap, _ in taps.values():
                    tap.stop()
        if args.pg:
            taps = {"admin off": start(bench, 1, False, args.pg), "admin on": start(bench, 1, True, args.pg)}
            try:
                idle.append(("postgres", 1, idle_cpu_ms_per_s({v: t.pid or 0 for v, (t, _) in taps.items()},
                                                                args.idle_s)))
            finally:
                for tap, _ in taps.values():
                    tap.stop()
        cells: list[Cell] = bench.data.cells
    load_end = psutil.getloadavg()
    command = "python -m bench.admin_bench " + " ".join(sys.argv[1:])
    lines = ["## Admin API", "",
             f"`{command.strip()}` (load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end: the "
             "machine is shared, so look at CPU per request, not requests per second). The full tap of the demo "
             "config (3 plugins, budgets, events) with the admin API off and on (listener up, "
             f"{MANAGED_APPS} API-managed apps with a key each, version row polled every 0.25 s), runs alternating "
             f"(A B / B A, {args.rounds} rounds of {args.duration} s, merged).", "",
             "| workers | concurrency | admin | req/s | p50 ms | p99 ms | CPU per request (µs) |",
             "|---|---|---|---|---|---|---|"]
    for c in cells:
        r = c.result
        lines.append(f"| {c.workers} | {c.concurrency} | {c.version.removeprefix('admin ')} | {r.rps:,.0f} | "
                     f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cpu_us:.0f} |")
    lines += ["", f"Idle CPU of the tap (all its processes, no traffic, {args.idle_s:.0f} s): what following the "
              "state costs.", "", "| store | workers | admin off (ms CPU/s) | admin on (ms CPU/s) | "
              "difference per worker (ms CPU/s) |", "|---|---|---|---|---|"]
    for backend, workers, values in idle:
        off, on = values["admin off"], values["admin on"]
        lines.append(f"| {backend} | {workers} | {off:.1f} | {on:.1f} | {(on - off) / workers:.1f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        write_section(section)


if __name__ == "__main__":
    main()
