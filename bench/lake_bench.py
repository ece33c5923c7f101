"""Lake collector: throughput against a bare loop, on local disk and on the test S3, and freshness at a steady rate.

1. start a private noida-db (Kafka only) and SeaweedFS (``weed mini``) on free ports;
2. **throughput**: produce ``--events`` analytics events (~470 B of real ``schemas`` JSON) to a topic with
   ``--partitions`` partitions, then consume the whole topic, each contender with a fresh consumer group, into
   the same destination:
   - ``bare``: aiokafka ``getmany()`` batches; per partition the values are collected until ``--rows`` events,
     converted to an Arrow table (``schemas.arrow.table_from_values``, the collector's own converter, so both
     pay the same JSON -> Arrow cost), written as one zstd Parquet object (local: temp file, fsync, rename;
     S3: one PUT), then a commit. No validation, no recovery look-ups, no hour split, no metrics;
   - ``lake``: the real :class:`CollectorRuntime` running the ``lake`` collector in-process (decode and validate,
     hold, roll per partition at ``flush_max_rows`` = ``--rows``, recovery look-up, conditional writes, commits).
   Rates are from the first event handed over to the last one durable; both run with the collector's GC
   tuning, in alternating order from round to round;
3. **freshness**: ``--rate`` events/s for ``--seconds`` through the lake collector with ``rotate_interval_ms`` =
   ``--rotate-ms``; per event, the time from ``emitted_at`` (set when produced) to the moment the object holding
   it was complete. Target: p99 <= rotate interval + 5 s.

Usage::

    .venv/bin/python -m bench.lake_bench [--events 300000] [--partitions 3] [--rows 100000]
                                         [--rate 2000 --seconds 30 --rotate-ms 5000] [--skip-freshness]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from bench.kafka_fill import fill_topic
from collectors.runtime import CollectorRuntime
from collectors.sinks.lake.collector import LakeCollector, _Partition
from gateway_tap.dev.servers import NoidaServer, SeaweedServer
from gateway_tap.eventloop import tune_gc
from gateway_tap.settings import CollectorSettings
from schemas import encode_event, topic_for
from schemas.arrow import table_from_values
from schemas.events import Analytics


@dataclass
class Result:
    name: str
    events: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s


def make_values(n: int, now: bool = False) -> list[bytes]:
    template = orjson.loads(encode_event(Analytics(
        gateway_id="tap-1", request_id="req", app_id="app-a", llm_id="openai-main", vendor="openai",
        model="gpt-4o-mini", prompt_tokens=10, completion_tokens=16, total_tokens=26, cost=0.0000111,
        latency_ms=12.5, ttft_ms=3.2, status_code=200, choices=1, tags={"team": "search"})))
    prefix = uuid.uuid4().hex[:8]
    return [orjson.dumps(template | {"id": f"{prefix}-{i:08d}", "request_id": f"req-{i}"}) for i in range(n)]


def destination(kind: str, work: Path, s3: SeaweedServer, bucket: str) -> dict[str, Any]:
    if kind == "local":
        return {"directory": str(work / f"lake-{uuid.uuid4().hex[:6]}")}
    return {"s3": {"bucket": bucket, "prefix": f"{uuid.uuid4().hex[:6]}/", "endpoint_url": s3.endpoint,
                   "addressing_style": "path"}}


async def bare(bootstrap: str, topic: str, expected: int, rows: int, dest: dict[str, Any]) -> Result:
    """The minimal loop: fetch, collect per partition, Arrow table, one Parquet object, commit."""
    import boto3
    from aiokafka import AIOKafkaConsumer

    s3 = None
    if "s3" in dest:
        s3 = boto3.client("s3", endpoint_url=dest["s3"]["endpoint_url"], region_name="us-east-1")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"bench-bare-{uuid.uuid4().hex[:8]}",
                                enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=5000,
                                fetch_max_bytes=50 * 1024 * 1024, max_partition_fetch_bytes=8 * 1024 * 1024)
    held: dict[int, list[bytes]] = {}
    seen, first = 0, 0.0

    def write(partition: int, values: list[bytes]) -> None:
        table = table_from_values("analytics", values)
        name = f"bare/{topic}+{partition}+{uuid.uuid4().hex}.parquet"
        if s3 is not None:
            sink = io.BytesIO()
            pq.write_table(table, sink, compression="zstd", compression_level=3, row_group_size=122_880)
            s3.put_object(Bucket=dest["s3"]["bucket"], Key=dest["s3"]["prefix"] + name, Body=sink.getvalue())
        else:
            path = Path(dest["directory"]) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd", compression_level=3, row_group_size=122_880)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    await consumer.start()
    try:
        while seen < expected:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if batches and not first:
                first = time.monotonic()
            wrote = False
            for tp, records in batches.items():
                values = held.setdefault(tp.partition, [])
                values += [r.value for r in records]
                seen += len(records)
                if len(values) >= rows or seen >= expected:
                    await asyncio.to_thread(write, tp.partition, values)
                    held[tp.partition] = []
                    wrote = True
            if seen >= expected:
                for p, values in held.items():
                    if values:
                        await asyncio.to_thread(write, p, values)
                wrote = True
            if wrote:
                await consumer.commit()
        done = time.monotonic()
    finally:
        await consumer.stop()
    return Result("bare loop", seen, done - first)


class _TimedLake(LakeCollector):
    """The lake collector, noting the first hand-over, rows made durable and each roll's completion."""

    first = 0.0
    handed_rows = 0
    durable_rows = 0
    expected = 0
    done: asyncio.Event
    freshness: list[float]

    async def handle_records(self, *args: Any) -> None:
        if not type(self).first:
            type(self).first = time.monotonic()
        type(self).handed_rows += len(args[2])
        await super().handle_records(*args)

    def _write_roll(self, part: _Partition, table: pa.Table) -> None:
        super()._write_roll(part, table)
        now = time.time()
        emitted = table["emitted_at"].cast(pa.int64()).to_pylist()
        type(self).freshness += [now - us / 1e6 for us in emitted]
        type(self).durable_rows += table.num_rows  # (``done`` is set by precommit, on the loop)

    async def precommit(self, force: bool) -> Any:
        # Like the bare loop, write the last partial objects as soon as every expected event arrived.
        answer = await super().precommit(force or type(self).handed_rows >= type(self).expected)
        if type(self).durable_rows >= type(self).expected:
            type(self).done.set()
        return answer


async def run_lake(bootstrap: str, prefix: str, expected: int, config: dict[str, Any], batch: int = 5000) -> Result:
    _TimedLake.first, _TimedLake.handed_rows, _TimedLake.durable_rows, _TimedLake.expected = 0.0, 0, 0, expected
    _TimedLake.done, _TimedLake.freshness = asyncio.Event(), []
    settings = CollectorSettings.model_validate({
        "group_id": f"bench-lake-{uuid.uuid4().hex[:8]}", "batch": {"max_events": batch, "max_wait_ms": 50},
        "max_in_flight_bytes": 256 * 1024 * 1024, "metrics": {"port": None}, "config": config})
    tune_gc()
    runtime = CollectorRuntime("lake", _TimedLake, settings, {"bootstrap_servers": bootstrap}, prefix)
    task = asyncio.create_task(runtime.run())
    await _TimedLake.done.wait()
    done = time.monotonic()
    runtime.request_stop()
    assert await task == 0
    return Result("lake collector", _TimedLake.durable_rows, done - _TimedLake.first)


def percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(p * 10) - 1] if len(values) > 1 else values[0]


async def freshness(bootstrap: str, config: dict[str, Any], rate: int, seconds: int, rotate_ms: int) -> str:
    from aiokafka import AIOKafkaProducer

    prefix = f"fresh{uuid.uuid4().hex[:6]}"
    topic = topic_for("analytics", prefix)
    await fill_topic(bootstrap, topic, 3, [])
    total = rate * seconds
    lake = asyncio.create_task(run_lake(bootstrap, prefix, total, {**config, "rotate_interval_ms": rotate_ms},
                                        batch=5000))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks=1)
    await producer.start()
    try:
        sent = 0
        started = time.monotonic()
        while sent < total:
            due = min(total, int((time.monotonic() - started) * rate) + 1)
            now = time.time()
            for i in range(sent, due):
                event = Analytics(gateway_id="g", request_id=f"r{i}", app_id=f"a{i % 7}", vendor="v", model="m",
                                  latency_ms=1.0, status_code=200)
                event.emitted_at = event.emitted_at.fromtimestamp(now, event.emitted_at.tzinfo)
                await producer.send(topic, encode_event(event), key=str(i % 64).encode())
            sent = due
            await asyncio.sleep(0.01)
    finally:
        await producer.stop()
    await lake
    fresh = _TimedLake.freshness
    return (f"freshness at {rate}/s for {seconds}s, rotate_interval_ms {rotate_ms}: p50 {percentile(fresh, 50):.2f}s, "
            f"p99 {percentile(fresh, 99):.2f}s, max {max(fresh):.2f}s (target p99 <= {rotate_ms / 1000 + 5:.1f}s)")


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="lake-bench-"))
    noida = NoidaServer(data_dir=work / "noida", services=("kafka",), log_path=work / "noida.log").start()
    weed = SeaweedServer(data_dir=work / "weed", log_path=work / "weed.log").start()
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = weed.access_key, weed.secret_key
    try:
        import boto3

        boto3.client("s3", endpoint_url=weed.endpoint, region_name="us-east-1").create_bucket(Bucket="bench-lake")
        prefix = f"bench{uuid.uuid4().hex[:6]}"
        topic = topic_for("analytics", prefix)
        values = make_values(args.events)
        size = sum(len(v) for v in values) / len(values)
        produce_s = await fill_topic(noida.bootstrap, topic, args.partitions, values)
        del values
        print(f"produced {args.events} events ({size:.0f} B avg) to {args.partitions} partitions in {produce_s:.1f}s; "
              f"load average {os.getloadavg()[0]:.1f}")
        tune_gc()  # the bare loop gets the collector's GC tuning too (it changes rates by up to 1.5x here)
        for kind in args.destinations:
            for round_ in range(args.rounds):
                rows = args.rows
                lake_config = {**destination(kind, work, weed, "bench-lake"), "flush_max_rows": rows,
                               "flush_max_bytes": 1 << 40, "rotate_interval_ms": 3_600_000}
                if round_ % 2:  # alternate the order: the second pass over a topic is not always the faster
                    lk = await run_lake(noida.bootstrap, prefix, args.events, lake_config)
                    b = await bare(noida.bootstrap, topic, args.events, rows,
                                   destination(kind, work, weed, "bench-lake"))
                else:
                    b = await bare(noida.bootstrap, topic, args.events, rows,
                                   destination(kind, work, weed, "bench-lake"))
                    lk = await run_lake(noida.bootstrap, prefix, args.events, lake_config)
                print(f"[{kind} round {round_ + 1}] bare {b.rate:,.0f} events/s ({b.elapsed_s:.2f}s), "
                      f"lake {lk.rate:,.0f} events/s ({lk.elapsed_s:.2f}s): lake / bare = {lk.rate / b.rate:.0%}; "
                      f"load average {os.getloadavg()[0]:.1f}")
        if not args.skip_freshness:
            for kind in args.destinations:
                line = await freshness(noida.bootstrap, destination(kind, work, weed, "bench-lake"), args.rate,
                                       args.seconds, args.rotate_ms)
                print(f"[{kind}] {line}; load average {os.getloadavg()[0]:.1f}")
        print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
    finally:
        weed.stop()
        noida.stop()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000, help="events per object (both loops)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--destinations", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--rotate-ms", type=int, default=5000)
    parser.add_argument("--skip-freshness", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(parse_args()))
