"""Collector memory with a stalled sink and a big backlog: RSS must stay bounded (partitions paused, not buffered).

1. a private noida-db (Kafka only); ``--events`` analytics events (~450 B, real ``schemas`` JSON) produced
   into 3 partitions before the collector starts: a backlog;
2. a child process runs :class:`CollectorRuntime` with the ``file`` collector whose first ``flush`` stalls for
   ``--stall-s`` seconds (a sink that hangs), then works normally until the whole backlog is written; it samples
   its own RSS every 0.5 s and reports the RSS before consuming, the peak during the stall, the peak
   afterwards (the drain) and the drain rate;
3. ``--before PATH`` runs the same child a second time importing an older checkout (``PYTHONPATH``).

noida-db ignores fetch size limits (a 1 MiB fetch can return ~90 MiB), so the bound holds only because the
runtime pauses the partitions, never because of ``fetch_max_bytes``.

Usage::

    .venv/bin/python bench/collector_rss.py [--events 1000000] [--stall-s 60] [--before /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def child(args: argparse.Namespace) -> None:
    """The collector under test (imports whatever checkout PYTHONPATH names)."""
    from collectors.runtime import CollectorRuntime
    from collectors.sinks.file import FileCollector
    try:
        from gateway_tap.eventloop import tune_gc
    except ImportError:  # a checkout from before tune_gc moved there
        from collectors.runtime import tune_gc  # type: ignore[attr-defined,no-redef]
    from gateway_tap.settings import CollectorSettings

    stall_until = 0.0
    handled = 0
    done = asyncio.Event()

    class StalledFile(FileCollector):
        async def flush(self) -> None:
            nonlocal stall_until
            if not stall_until:
                stall_until = time.monotonic() + args.stall_s
            await asyncio.sleep(max(0.0, stall_until - time.monotonic()))
            await super().flush()

    class Counting(StalledFile):
        async def handle_raw_batch(self, event_type: Any, events: Any, values: Any) -> None:
            nonlocal handled
            await super().handle_raw_batch(event_type, events, values)
            handled += len(events)
            if handled >= args.events:
                done.set()

    raw: dict[str, Any] = {"group_id": f"rss-{uuid.uuid4().hex[:8]}", "metrics": {"port": None},
                           "config": {"directory": args.out, "fsync": "never"}}
    if "max_in_flight_bytes" in CollectorSettings.model_fields:
        raw["max_in_flight_bytes"] = args.max_in_flight_bytes
    settings = CollectorSettings.model_validate(raw)
    tune_gc()
    base = rss_mib()
    runtime = CollectorRuntime("file", Counting, settings, {"bootstrap_servers": args.bootstrap}, args.prefix)
    task = asyncio.create_task(runtime.run())
    stall_peak = after_peak = base
    drained_at = 0.0
    while not done.is_set():
        await asyncio.sleep(0.5)
        now = time.monotonic()
        rss = rss_mib()
        if not stall_until or now < stall_until:
            stall_peak = max(stall_peak, rss)
        else:
            after_peak = max(after_peak, rss)
    drained_at = time.monotonic()
    runtime.request_stop()
    await task
    print(json.dumps({"base_mib": base, "stall_peak_mib": stall_peak, "after_peak_mib": after_peak,
                      "drain_s": drained_at - stall_until, "events": handled}), flush=True)


async def parent(args: argparse.Namespace) -> None:
    from bench.collector_bench import make_values
    from bench.kafka_fill import fill_topic
    from gateway_tap.dev.servers import NoidaServer
    from schemas import topic_for

    work = Path(tempfile.mkdtemp(prefix="collector-rss-"))
    server = NoidaServer(data_dir=work / "noida", services=("kafka",), log_path=work / "noida.log").start()
    try:
        prefix = f"rss{uuid.uuid4().hex[:6]}"
        values = make_values(args.events)
        size = sum(map(len, values))
        produce_s = await fill_topic(server.bootstrap, topic_for("analytics", prefix), 3, values)
        del values
        print(f"backlog: {args.events} events, {size / 2**20:.0f} MiB of values, produced in {produce_s:.0f}s",
              flush=True)
        runs = [("after", None)] + ([("before", args.before)] if args.before else [])
        for label, path in runs:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path
            argv = [sys.executable, str(SCRIPT), "--child", "--bootstrap", server.bootstrap,
                    "--prefix", prefix, "--events", str(args.events), "--stall-s", str(args.stall_s),
                    "--out", str(work / label), "--max-in-flight-bytes", str(args.max_in_flight_bytes)]
            out = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{label}: child failed:\n{out.stderr[-3000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label:7s} RSS before consuming {r['base_mib']:.0f} MiB, peak during the {args.stall_s:.0f}s "
                  f"stall {r['stall_peak_mib']:.0f} MiB, peak while draining {r['after_peak_mib']:.0f} MiB; "
                  f"drained {r['events']} events in {r['drain_s']:.1f}s after the stall", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--stall-s", type=float, default=60.0)
    parser.add_argument("--max-in-flight-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--before", help="a checkout of the older code, measured the same way")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.child:
        asyncio.run(child(arguments))
    else:
        sys.path.insert(0, str(SCRIPT.parent.parent))
        asyncio.run(parent(arguments))
