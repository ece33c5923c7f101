"""Collector runtime decision: bare aiokafka batch consumption vs a faust-streaming agent.

One run, one broker, one topic, the same events for every contender:

1. start a private noida-db broker (Kafka only) on free ports;
2. produce ``--events`` analytics events (real ``schemas`` JSON, ~450 B) to a topic
   with ``--partitions`` partitions;
3. consume the whole topic with a fresh consumer group per contender:
   - ``aiokafka``: ``getmany()`` batches + ``orjson.loads`` per event + a commit per
     batch (what the collector runtime does, minus the sink);
   - ``faust-agent``: a faust-streaming agent iterating the stream event by event;
   - ``faust-take``: the same agent consuming ``stream.take(1000, within=1s)`` batches.

faust-streaming is not a project dependency: it runs from its own venv
(``bench/.venv-faust``, created on first use) as a worker subprocess whose app file
is written to a temp dir. Both sides use aiokafka 0.14 and orjson for decoding.

Rates are steady-state (first event to last event); ``startup`` is the time from
launching the consumer (process start for faust) to its first event.

Usage::

    .venv/bin/python -m bench.faust_vs_aiokafka [--events 200000] [--partitions 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.kafka_fill import fill_topic
from gateway_tap.dev.servers import ManagedProcess, NoidaServer, StartupError
from schemas.events import Analytics

BENCH_DIR = Path(__file__).resolve().parent
FAUST_VENV = BENCH_DIR / ".venv-faust"
FAUST_REQUIREMENTS = ("faust-streaming>=0.11,<0.16", "orjson>=3.10,<4")

FAUST_APP = '''
"""faust-streaming worker for bench/faust_vs_aiokafka.py (generated)."""
import os
import time

import faust

BROKER = os.environ["BENCH_BROKER"]
TOPIC = os.environ["BENCH_TOPIC"]
EXPECTED = int(os.environ["BENCH_EVENTS"])
MODE = os.environ["BENCH_MODE"]
OUT = os.environ["BENCH_OUT"]

app = faust.App(
    os.environ["BENCH_GROUP"],
    broker="kafka://" + BROKER,
    store="memory://",
    web_enabled=False,
    topic_partitions=int(os.environ["BENCH_PARTITIONS"]),
    consumer_auto_offset_reset="earliest",
)
topic = app.topic(TOPIC, key_type=bytes, value_serializer="json")


def finish(first, count):
    tmp = OUT + ".tmp"
    with open(tmp, "w") as fh:
        fh.write('{"first": %r, "last": %r, "count": %d}' % (first, time.monotonic(), count))
    os.replace(tmp, OUT)


@app.agent(topic)
async def count(stream):
    seen = 0
    first = None
    if MODE == "take":
        async for batch in stream.take(1000, within=1.0):
            if first is None:
                first = time.monotonic()
            seen += len(batch)
            if seen >= EXPECTED:
                finish(first, seen)
    else:
        async for _value in stream:
            if first is None:
                first = time.monotonic()
            seen += 1
            if seen >= EXPECTED:
                finish(first, seen)


if __name__ == "__main__":
    app.main()
'''


@dataclass
class Result:
    """One contender's measurement. ``error`` is set (and rates are 0) when it failed."""

    name: str
    count: int = 0
    startup_s: float = 0.0
    consume_s: float = 0.0
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.count / self.consume_s if self.consume_s > 0 else 0.0


def sample_event_values(n: int) -> list[bytes]:
    """``n`` distinct analytics events as Kafka values (one template, fresh ids)."""
    template = Analytics(
        gateway_id="tap-bench", request_id="r", app_id="app-bench", llm_id="openai-main", vendor="openai",
        model="gpt-4o-mini", prompt_tokens=812, completion_tokens=96, total_tokens=908, cost=0.000179,
        latency_ms=412.5, ttft_ms=88.1, upstream_ms=405.2, status_code=200, streamed=True, choices=1,
        tags={"team": "search", "env": "prod"},
    ).to_dict()
    template["emitted_at"] = template["emitted_at"].isoformat()
    values = []
    for i in range(n):
        template["id"] = f"{uuid.uuid4()}"
        template["request_id"] = f"req-{i}"
        values.append(orjson.dumps(template))
    return values


async def consume_aiokafka(bootstrap: str, topic: str, expected: int) -> Result:
    """The collector runtime's loop without a sink: batch fetch, decode, commit per batch."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-aiokafka-{uuid.uuid4().hex[:8]}",
                                enable_auto_commit=False, auto_offset_reset="earliest")
    launched = time.monotonic()
    await consumer.start()
    seen, first = 0, 0.0
    try:
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if batches and not first:
                first = time.monotonic()
            for records in batches.values():
                for record in records:
                    orjson.loads(record.value)  # type: ignore[arg-type]
                seen += len(records)
            if batches:
                await consumer.commit()
    finally:
        await consumer.stop()
    return Result("aiokafka", seen, first - launched, time.monotonic() - first)


def ensure_faust_venv() -> Path:
    """The faust venv's python, created with ``pip install faust-streaming`` on first use."""
    python = FAUST_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {FAUST_VENV} (pip install {' '.join(FAUST_REQUIREMENTS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FAUST_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *FAUST_REQUIREMENTS], check=True)
    return python


def consume_faust(python: Path, bootstrap: str, topic: str, partitions: int, expected: int, mode: str,
                  workdir: Path, timeout: float) -> Result:
    name = f"faust-{mode}"
    app_file = workdir / "faust_bench_app.py"
    app_file.write_text(FAUST_APP)
    out = workdir / f"{name}.json"
    worker = ManagedProcess(
        name,
        [str(python), str(app_file), "worker", "--loglevel", "warn"],
        ready=out.exists,
        env={"BENCH_BROKER": bootstrap, "BENCH_TOPIC": topic, "BENCH_EVENTS": str(expected), "BENCH_MODE": mode,
             "BENCH_OUT": str(out), "BENCH_GROUP": f"bench-{name}-{uuid.uuid4().hex[:8]}",
             "BENCH_PARTITIONS": str(partitions)},
        log_path=workdir / f"{name}.log",
        cwd=workdir,  # faust writes its data dir next to the app
        start_timeout=timeout,
        stop_signal=signal.SIGTERM,
        stop_timeout=20.0,
    )
    launched = time.monotonic()
    try:
        worker.start()
    except StartupError as exc:
        return Result(name, error=str(exc))  # carries the worker's log tail
    finally:
        worker.stop()
    data = orjson.loads(out.read_bytes())
    return Result(name, int(data["count"]), data["first"] - launched, data["last"] - data["first"])


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--faust-timeout", type=float, default=180.0, help="Give up on a faust run after this long.")
    parser.add_argument("--skip-faust", action="store_true")
    args = parser.parse_args()

    print(f"{time.strftime('%Y-%m-%d %H:%M %Z')}  python {platform.python_version()}  {load_note()}", flush=True)
    python = None if args.skip_faust else ensure_faust_venv()
    with tempfile.TemporaryDirectory(prefix="bench-faust-") as tmp:
        workdir = Path(tmp)
        with NoidaServer(data_dir=workdir / "noida", services=("kafka",), log_path=workdir / "noida.log") as noida:
            topic = "bench.analytics"
            values = sample_event_values(args.events)
            size = sum(map(len, values)) / len(values)
            took = asyncio.run(fill_topic(noida.bootstrap, topic, args.partitions, values))
            del values
            print(f"produced {args.events} events ({size:.0f} B avg) to {args.partitions} partitions "
                  f"in {took:.2f}s ({args.events / took:,.0f}/s)", flush=True)
            results = [asyncio.run(consume_aiokafka(noida.bootstrap, topic, args.events))]
            print(f"  {results[-1].name}: {results[-1].rate:,.0f} events/s", flush=True)
            if python is not None:
                for mode in ("agent", "take"):
                    results.append(consume_faust(python, noida.bootstrap, topic, args.partitions, args.events,
                                                 mode, workdir, args.faust_timeout))
                    r = results[-1]
                    print(f"  {r.name}: " + (f"FAILED: {r.error}" if r.error else f"{r.rate:,.0f} events/s"),
                          flush=True)

    base = results[0].rate
    print(f"\n{'contender':<12} {'events':>8} {'startup s':>10} {'consume s':>10} {'events/s':>10} {'vs aiokafka':>12}")
    for r in results:
        ratio = f"{base / r.rate:.1f}x slower" if r.rate and r is not results[0] else ("-" if r.rate else "failed")
        print(f"{r.name:<12} {r.count:>8} {r.startup_s:>10.2f} {r.consume_s:>10.2f} {r.rate:>10,.0f} {ratio:>12}")
    print(f"\nafter the run: {load_note()}")


if __name__ == "__main__":
    main()
