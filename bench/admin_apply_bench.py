"""Admin state apply at scale: what one change costs a tap worker that follows a large admin state.

A tap worker (in process: ``create_app`` + ``AdminLink``, the three example plugins, SQLite admin state) with
``--apps`` API apps and ``--keys`` keys (written straight into the tables, then applied once). Then ``--changes``
operator changes, each followed by one poll that applies it (``AdminLink.refresh``): a key issued, a key revoked,
an app renamed, in turn. For each apply: its wall time, and the longest the event loop was unavailable meanwhile
(a probe task sleeps 1 ms in a loop; its worst lateness is what a request arriving then would have waited).

    .venv/bin/python -m bench.admin_apply_bench [--apps 10000] [--keys 20000] [--changes 6] [--before CHECKOUT]
        [--write]

``--before CHECKOUT`` (e.g. ``git archive main | tar -x -C /tmp/before``) measures that checkout too, in the same
run (runs alternate: before, after, after, before), each in a fresh process with the checkout first on
``sys.path``. ``--write`` replaces the "## Admin state apply at scale" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Admin state apply at scale"


class LagProbe:
    """The event loop's worst lateness while started: a task sleeping ``interval_s`` in a loop."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.interval_s = interval_s
        self.worst_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            started = clock()
            await asyncio.sleep(self.interval_s)
            self.worst_s = max(self.worst_s, clock() - started - self.interval_s)

    async def measure(self, work: Any) -> tuple[float, float]:
        """(wall seconds of ``await work``, worst loop lateness meanwhile in seconds)."""
        self.worst_s = 0.0
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)  # the probe is sleeping when the work starts
        self.worst_s = 0.0
        started = time.perf_counter()
        await work
        elapsed = time.perf_counter() - started
        await asyncio.sleep(0.005)  # a stall at the very end is seen by the probe's next wake-up
        self._task.cancel()
        return elapsed, self.worst_s


def fill_state(db: Path, apps: int, keys: int) -> None:
    """``apps`` apps (``app-<i>``) and ``keys`` keys (``key_<i>``, spread over the apps) straight into the admin
    tables of the SQLite file ``db`` (migrated), and the version bumped: what a large deployment's state looks like."""
    now = time.time()
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO admin_apps (id, name, allowed_llms, metadata, enabled, created_s, updated_s) "
                         "VALUES (?, ?, ?, ?, 1, ?, ?)",
                         [(f"app-{i}", f"App {i}", '["*"]', '{"team": "bench"}', now, now) for i in range(apps)])
        conn.executemany("INSERT INTO admin_keys (id, app_id, key_hash, prefix, created_s) VALUES (?, ?, ?, ?, ?)",
                         [(f"key_{i}", f"app-{i % apps}", "sha256:" + hashlib.sha256(f"k{i}".encode()).hexdigest(),
                           "gt-bench00", now) for i in range(keys)])
        conn.execute("UPDATE admin_state SET version = version + 1")
    conn.close()


async def _child(apps: int, keys: int, changes: int) -> dict[str, Any]:
    from gateway_tap.admin.db import apply_migrations
    from gateway_tap.eventloop import tune_gc
    from gateway_tap.proxy.admin_link import AdminLink
    from gateway_tap.proxy.app import create_app
    from gateway_tap.settings import BudgetStoreSettings, parse_config

    tmp = Path(tempfile.mkdtemp(prefix="admin-apply-bench-"))
    store = BudgetStoreSettings(backend="sqlite", sqlite_path=str(tmp / "budgets.sqlite3"))
    await apply_migrations(store)
    fill_state(tmp / "budgets.sqlite3", apps, keys)
    os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench"
    plugins = [
        {"name": "prompt_firewall", "use": "gateway_tap.examples.plugins.prompt_firewall:PromptFirewall",
         "config": {"patterns": ["ignore (all )?previous instructions"]}},
        {"name": "request_enricher", "use": "gateway_tap.examples.plugins.request_enricher:RequestEnricher",
         "config": {"headers": {"x-gateway": "gateway-tap"}}},
        {"name": "response_modifier", "use": "gateway_tap.examples.plugins.response_modifier:ResponseModifier",
         "config": {"headers": {"x-served-by": "gateway-tap"}}},
    ]
    config = parse_config({
        "gateway_id": "admin-apply-bench",
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "topic_prefix": "bench"},  # never started: no events here
        "tap": {"publisher": {"spool_dir": str(tmp / "spool")}, "admin": {"sync": True, "poll_interval_s": 60}},
        "llms": [{"id": "openai", "vendor": "openai", "upstream_url": "http://127.0.0.1:9",
                  "api_key_env": "BENCH_UPSTREAM_KEY", "prices": {"*": {"input_per_1m": 1, "output_per_1m": 1}}}],
        "apps": [{"id": "file-app", "key_hashes": ["sha256:" + hashlib.sha256(b"file").hexdigest()]}],
        "plugins": plugins,
        "budget_store": store.model_dump(),
    })
    tap = await create_app(config)
    link = await AdminLink.open(tap)
    probe = LagProbe()
    first_s, first_lag_s = await probe.measure(link.start())
    assert len(tap.config.apps) == apps + 1, "the state was not applied"
    tune_gc()  # as a worker does once it serves (after the first apply)
    results: list[tuple[str, float, float]] = []
    issued: list[tuple[str, str]] = []  # (app id, key id)
    for i in range(changes):
        kind = ("issue key", "revoke key", "rename app")[i % 3]
        app_id = f"app-{(i * 7919) % apps}"
        if kind == "issue key":
            (key, _secret), _ = await link.store.issue_key(app_id)
            issued.append((app_id, key.id))
        elif kind == "revoke key":
            await link.store.revoke_key(*issued[-1])
        else:
            await link.store.update_app(app_id, {"name": f"Renamed {i}"})
        elapsed, lag = await probe.measure(link.refresh())
        if kind == "issue key":
            assert key.key_hash in tap.apps.by_hash, "the change was not applied"
        elif kind == "revoke key":
            assert key.key_hash not in tap.apps.by_hash, "the change was not applied"
            issued.pop()
        else:
            assert tap.apps.by_id[app_id].name == f"Renamed {i}", "the change was not applied"
        results.append((kind, elapsed, lag))
    await link.stop()
    return {"first": [first_s, first_lag_s], "changes": results, "generation": tap.snapshot.generation}


def _run_child(root: Path, apps: int, keys: int, changes: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--apps", str(apps),
                          "--keys", str(keys), "--changes", str(changes)], env=env, cwd=root, check=True,
                         capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=20_000)
    parser.add_argument("--changes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="Runs per version (alternating with --before).")
    parser.add_argument("--before", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.apps, args.keys, args.changes))), flush=True)
        os._exit(0)  # the tap was never served (no publisher, no runner): nothing of it to close
    roots = {"after": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    pair = ("before", "after") if "before" in roots else ("after",)
    order = [v for r in range(args.rounds) for v in (pair if r % 2 == 0 else pair[::-1])]
    load_start = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in roots}
    for version in order:
        runs[version].append(_run_child(roots[version], args.apps, args.keys, args.changes))
        print(version, runs[version][-1], file=sys.stderr)
    load_end = os.getloadavg()
    command = "python -m bench.admin_apply_bench " + " ".join(a for a in sys.argv[1:] if a != "--write")
    lines = [SECTION, "",
             f"`{command.strip()}` (load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at the end: the "
             f"machine is shared). One tap worker in process with {args.apps:,} API apps and {args.keys:,} keys "
             f"(SQLite), the three example plugins; {args.changes} changes (a key issued, a key revoked, an app "
             "renamed, in turn), each applied by one poll. *Apply* is that poll's wall time; *loop stall* the "
             "longest the event loop was unavailable meanwhile (a probe sleeping 1 ms; what a request arriving "
             f"then waits). {args.rounds} runs per version" + (", alternating." if "before" in roots else ".") +
             " The worker's garbage collector is tuned as `serve` tunes it (`tune_gc`, after the first apply). "
             "What stalls the loop after the change is mostly young garbage collections of the new state's objects "
             "(`loop_monitor.log_stalls_over_ms` names them); before it, checking every app on the loop, twice.", "",
             "| version | first apply s | its loop stall ms | change apply ms (median / max) | "
             "change loop stall ms (median / max) |", "|---|---|---|---|---|"]
    for version in sorted(roots, reverse=True):
        firsts = [r["first"] for r in runs[version]]
        applies = [c[1] * 1e3 for r in runs[version] for c in r["changes"]]
        stalls = [c[2] * 1e3 for r in runs[version] for c in r["changes"]]
        lines.append(f"| {version} | {statistics.median(f[0] for f in firsts):.2f} | "
                     f"{statistics.median(f[1] * 1e3 for f in firsts):.0f} | "
                     f"{statistics.median(applies):.0f} / {max(applies):.0f} | "
                     f"{statistics.median(stalls):.1f} / {max(stalls):.1f} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        from bench.tap_bench import write_section

        write_section(section)


if __name__ == "__main__":
    main()
