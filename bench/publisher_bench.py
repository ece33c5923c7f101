"""Publisher throughput against a local noida-db broker.

Measures: publish() calls/s (the request hot path, including event encoding),
publish_message() calls/s (pre-encoded), end-to-end events/s until Kafka acknowledged
all of them, and the spool's write and drain rates (broker down, then up).

    .venv/bin/python -m bench.publisher_bench [--events 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import prometheus_client

from gateway_tap.dev.servers import NoidaServer
from gateway_tap.publisher import EventPublisher
from gateway_tap.settings import KafkaSettings, PublisherSettings
from schemas import Analytics


def events(n: int) -> list[Analytics]:
    return [Analytics(gateway_id="bench", request_id=f"r{i}", app_id=f"app-{i % 8}", llm_id="gpt", vendor="openai",
                      model="gpt-4o-mini", prompt_tokens=12, completion_tokens=30, total_tokens=42, cost=0.0001,
                      latency_ms=12.5, status_code=200) for i in range(n)]


def make(bootstrap: str, prefix: str, spool: Path, n: int) -> EventPublisher:
    kafka = KafkaSettings(bootstrap_servers=bootstrap, topic_prefix=prefix)  # type: ignore[call-arg]
    settings = PublisherSettings(queue_max_events=n + 1, retry_interval_s=0.2)  # type: ignore[call-arg]
    return EventPublisher(kafka, settings, spool_dir=spool, registry=prometheus_client.CollectorRegistry())


async def until(check: object, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not reached")
        await asyncio.sleep(0.005)


async def run(server: NoidaServer, n: int, tmp: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    batch = events(n)

    pub = make(server.bootstrap, "bench1", tmp / "s1", n)
    await pub.start()
    t0 = time.perf_counter()
    for event in batch:
        pub.publish(event)
    t1 = time.perf_counter()
    await until(lambda: pub.stats()["published"] >= n)
    t2 = time.perf_counter()
    out["publish() calls/s"] = n / (t1 - t0)
    out["publish() mean us/call"] = (t1 - t0) / n * 1e6
    out["end-to-end events/s (publish -> acked)"] = n / (t2 - t0)
    await pub.stop()

    encoded = [(e.to_json(), (e.app_id or "").encode()) for e in batch]
    pub = make(server.bootstrap, "bench2", tmp / "s2", n)
    await pub.start()
    headers = [("type", b"analytics"), ("schema_version", b"1")]
    t0 = time.perf_counter()
    for value, key in encoded:
        pub.publish_message("bench2.analytics", value, key, headers)
    t1 = time.perf_counter()
    await until(lambda: pub.stats()["published"] >= n)
    t2 = time.perf_counter()
    out["publish_message() calls/s"] = n / (t1 - t0)
    out["end-to-end events/s, pre-encoded"] = n / (t2 - t0)
    await pub.stop()

    await asyncio.to_thread(server.stop)
    pub = make(server.bootstrap, "bench3", tmp / "s3", n)
    await pub.start()
    t0 = time.perf_counter()
    for event in batch:
        pub.publish(event)
    await until(lambda: pub.stats()["spool_pending_events"] >= n)
    t1 = time.perf_counter()
    out["spool write events/s (broker down)"] = n / (t1 - t0)
    await asyncio.to_thread(server.start)
    t2 = time.perf_counter()
    await until(lambda: pub.stats()["spool_pending_events"] == 0)
    t3 = time.perf_counter()
    out["spool drain events/s (broker back)"] = n / (t3 - t2)
    await pub.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = NoidaServer(data_dir=tmp / "noida", services=("kafka",), log_path=tmp / "noida.log")
        with ThreadPoolExecutor(1) as pool:  # start() probes with asyncio.run(); keep it off the main loop
            pool.submit(server.start).result()
        try:
            results = asyncio.run(run(server, args.events, tmp))
        finally:
            server.stop()
    print(f"| measure ({args.events} analytics events, ~450 B) | value |")
    print("|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:,.1f} |")


if __name__ == "__main__":
    main()
