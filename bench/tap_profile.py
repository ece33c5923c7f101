"""Sampling profile of one tap worker under load, summed by layer (py-spy, from the ``bench`` extra).

Starts the broker, the mock and one tap variant of ``bench.tap_bench`` (1 worker), drives it with wrk and
records the worker with ``py-spy record --format raw`` (collapsed stacks; idle samples excluded). Each
sample is charged to the layer of its innermost frame that belongs to one (``LAYERS``: e.g. a pydantic
frame under ``Exchange.events`` is "events: build + encode", a prometheus-client frame under the handler
is "metrics"); the layer shares times the worker's measured CPU µs/request give µs per layer.

    .venv/bin/pip install -e '.[dev,bench]'   # py-spy
    .venv/bin/python -m bench.tap_profile [--variant plugins] [--concurrency 16] [--seconds 20]
        [--root CHECKOUT] [--out bench/profiles] [--native]

Writes ``<out>/<variant>-c<N>.txt`` (collapsed stacks, for flamegraph tools or speedscope) and
``<out>/<variant>-c<N>.md`` (the layer table and the top functions by own samples).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

from bench.tap_bench import ROOT, VARIANTS, Bench, cpu_seconds, tap_config, wrk
from gateway_tap.dev.servers import ManagedProcess, free_port, http_ok

# (layer, substrings of "function (file)"); a sample goes to the first layer met walking from the leaf up.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("metrics (prometheus-client)", ("prometheus_client",)),
    ("producer (aiokafka; confluent-kafka via publisher/kafka.py)", ("aiokafka", "kafka/", "publisher/kafka.py")),
    ("publisher (queue, spool)", ("gateway_tap/publisher",)),
    ("events: build + encode", ("schemas/", "pydantic", "uuid_utils", "events (", "redact_headers",
                                "capture_body", "_is_sensitive")),
    ("budgets", ("gateway_tap/budgets", "proxy/budget.py")),
    ("asyncio.timeout", ("asyncio/timeouts.py",)),
    ("hook chain + plugins", ("plugins/chain.py", "gateway_tap/hooks.py", "examples/plugins", "plugins/examples")),
    ("accounting (usage, cost)", ("proxy/accounting.py",)),
    ("record (metrics labels, settle)", ("proxy/app.py",)),
    ("handler (own code, header copies)", ("proxy/handler.py", "proxy/auth.py", "proxy/exchange.py",
                                           "proxy/errors.py", "multidict")),
    ("aiohttp client", ("aiohttp/client", "aiohttp/connector", "aiohttp/streams", "yarl")),
    ("aiohttp server", ("aiohttp/web", "aiohttp/http", "aiohttp/base_protocol", "aiohttp/helpers")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop")),
]


def layer_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        for layer, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return layer
    return "other"


def _function(frame: str) -> str:
    """``fn (path/file.py:12)`` -> ``fn (path/file.py)``: samples of one function summed over its lines."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})" if where else name


def summarize(raw: Path, cpu_us: float, title: str) -> str:
    by_layer: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        by_layer[layer_of(stack)] += count
        own[_function(stack[-1])] += count
        for fn in {_function(frame) for frame in stack if "gateway_tap/" in frame or "schemas/" in frame}:
            inclusive[fn] += count
        total += count
    lines = [f"### {title}", "", f"{total} samples; worker CPU {cpu_us:,.0f} µs/request during the profile.", "",
             "| layer | share of samples | ≈ µs/request |", "|---|---|---|"]
    for layer, count in by_layer.most_common():
        lines.append(f"| {layer} | {count / total:.1%} | {count / total * cpu_us:,.0f} |")
    lines += ["", "| our function (inclusive: itself and what it calls) | share | ≈ µs/request |", "|---|---|---|"]
    for frame, count in inclusive.most_common(30):
        lines.append(f"| `{frame}` | {count / total:.1%} | {count / total * cpu_us:,.0f} |")
    lines += ["", "| function (own samples) | share | ≈ µs/request |", "|---|---|---|"]
    for frame, count in own.most_common(40):
        lines.append(f"| `{frame}` | {count / total:.1%} | {count / total * cpu_us:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--summarize":  # re-read a recorded profile: RAW CPU_US
        print(summarize(Path(sys.argv[2]), float(sys.argv[3]), sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="plugins", choices=list(VARIANTS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--root", type=Path, default=ROOT, help="The checkout to profile.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "profiles")
    parser.add_argument("--native", action="store_true", help="Also sample C frames (py-spy --native).")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    variant = VARIANTS[args.variant]
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{variant.name}-c{args.concurrency}"
    with Bench(args.seconds, [args.concurrency], 1.0) as bench:
        port = free_port()
        config = tap_config(bench.tmp / "tap", bench.mock_url, bench.noida.bootstrap, port, 1, variant, "profile")
        argv = [sys.executable, str(ROOT / "bench" / "tap_worker.py"), "--root", str(args.root.resolve()),
                "--config", str(config), "--workers", "1", *(() if variant.events else ("--no-events",))]
        tap = ManagedProcess("tap", argv, ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                             log_path=bench.tmp / "tap.log", stop_signal=15, stop_timeout=30).start()
        try:
            assert tap.pid is not None
            url = f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions"
            script = bench.stream if variant.stream else bench.plain
            wrk(url, args.concurrency, 3, script)  # warm-up
            load: dict[str, float] = {}

            def drive() -> None:
                before = cpu_seconds(tap.pid)  # type: ignore[arg-type]
                r = wrk(url, args.concurrency, args.seconds + 2, script)
                load["cpu_us"] = (cpu_seconds(tap.pid) - before) / max(1.0, r.rps * (args.seconds + 2)) * 1e6  # type: ignore[arg-type]
                load["rps"] = r.rps

            driver = threading.Thread(target=drive)
            driver.start()
            raw = args.out / f"{name}.txt"
            subprocess.run([py_spy, "record", "--pid", str(tap.pid), "--duration", str(args.seconds), "--rate", "250",
                            "--format", "raw", "--output", str(raw), "--nonblocking",
                            *(["--native"] if args.native else [])],
                           check=True, capture_output=True)
            driver.join()
        finally:
            tap.stop()
    summary = summarize(raw, load["cpu_us"], f"{variant.label}, 1 worker, c={args.concurrency}, "
                                             f"{load['rps']:,.0f} RPS ({args.root.resolve().name})")
    (args.out / f"{name}.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
