"""The otlp collector's throughput against a bare protobuf-encode-and-POST loop.

Both send the same analytics events (realistic 1.2 events with every GenAI field and the cost split) as the
same OTLP/HTTP requests (spans, then the two histograms; gzip) to the same receiver, a separate process that
reads and decodes nothing (so the figures are the sender's):

- ``collector``: what the runtime does per batch without Kafka: every value validated against the contract
  (``schemas.wire.validate_event_bytes``), then ``OtlpCollector.handle_raw_batch`` (decode, spans, histograms,
  protobuf, gzip, POST);
- ``bare``: a hand-written loop: each value decoded straight into the fields the spans need (msgspec), the same
  span and histogram building, protobuf, gzip, POST over one aiohttp session; no validation, no SDK.

Rounds alternate (bare, collector, bare, ...) so the machine's load hits both alike; the report gives each
round and the collector / bare ratio of the medians.

    .venv/bin/python -m bench.otlp_bench [--events 20000] [--batch 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import aiohttp
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from collectors.sdk import CollectorServices
from collectors.sinks.otlp import _CALL, SCHEMA_URL, OtlpCollector, _attr, _Histograms, span_of
from gateway_tap.dev.servers import free_port, http_ok
from schemas import Analytics, encode_event
from schemas.wire import LazyEvents, validate_event_bytes

RECEIVER = """
import sys
from aiohttp import web
async def sink(request):
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")
async def ok(request):
    return web.Response(text="ok")
app = web.Application(client_max_size=256 * 1024 * 1024)
app.router.add_post("/v1/{signal}", sink)
app.router.add_get("/healthz", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def events(count: int) -> list[bytes]:
    start = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
    out = []
    for i in range(count):
        out.append(encode_event(Analytics(
            gateway_id="tap-1", request_id=f"req_{i}", app_id=f"team-{i % 20}", llm_id="openai", user_id=f"u{i % 500}",
            trace_id=f"{i:032x}", span_id=f"{i + 1:016x}", parent_span_id=f"{i + 7:016x}",
            emitted_at=start + timedelta(milliseconds=i), vendor="openai", model="gpt-4o-mini-2024-07-18",
            prompt_tokens=1000 + i % 900, completion_tokens=200 + i % 300, total_tokens=1200 + i % 900 + i % 300,
            cache_read_tokens=512, reasoning_tokens=64 if i % 3 == 0 else None, cost=0.00042, cost_micros=420,
            cost_input_micros=150, cost_cache_read_micros=38, cost_cache_write_micros=0, cost_output_micros=194,
            cost_reasoning_micros=38, price_version="genai-prices-0.2.3+0123456789ab",
            price_source="catalog:openai/gpt-4o-mini", latency_ms=300.0 + i % 4000, ttft_ms=80.0, status_code=200,
            streamed=i % 2 == 0, operation="chat", request_model=["gpt-4o-mini", "gpt-4o", "o3-mini"][i % 3],
            response_model="gpt-4o-mini-2024-07-18", response_id=f"chatcmpl-{i}", finish_reasons=["stop"],
            request_max_tokens=512, request_temperature=0.7, request_top_p=1.0, request_stream=i % 2 == 0,
            server_address="api.openai.com", server_port=443, tags={"team": f"t{i % 5}"})))
    return out


def _rates(count: int, started: float, cpu: float) -> tuple[float, float]:
    """(events per second of wall time, CPU µs of this process per event: steadier on a loaded machine)."""
    return count / (time.perf_counter() - started), (time.process_time() - cpu) / count * 1e6


async def run_bare(url: str, values: list[bytes], batch: int) -> tuple[float, float]:
    resource, scope = Resource(), InstrumentationScope(name="gateway-tap")
    _attr(resource.attributes, "service.name", "gateway-tap")
    headers = {"content-type": "application/x-protobuf", "content-encoding": "gzip"}
    window = time.time_ns()
    async with aiohttp.ClientSession() as session:
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(values), batch):
            calls = [_CALL.decode(v) for v in values[i:i + batch]]
            request = ExportTraceServiceRequest()
            spans = request.resource_spans.add(resource=resource, schema_url=SCHEMA_URL).scope_spans.add(
                scope=scope, schema_url=SCHEMA_URL).spans
            for call in calls:
                span_of(call, spans.add())
            async with session.post(f"{url}/v1/traces", data=gzip.compress(request.SerializeToString(), 1),
                                    headers=headers) as resp:
                await resp.read()
            histograms = _Histograms()
            for call in calls:
                histograms.add(call)
            now = time.time_ns()
            metrics = ExportMetricsServiceRequest()
            metrics.resource_metrics.add(resource=resource, schema_url=SCHEMA_URL).scope_metrics.add(
                scope=scope, schema_url=SCHEMA_URL).metrics.extend(histograms.metrics(window, now))
            window = now
            async with session.post(f"{url}/v1/metrics", data=gzip.compress(metrics.SerializeToString(), 1),
                                    headers=headers) as resp:
                await resp.read()
        return _rates(len(values), started, cpu)


async def run_collector(url: str, values: list[bytes], batch: int) -> tuple[float, float]:
    import logging

    collector = OtlpCollector()
    await collector.initialize({"endpoint": url}, CollectorServices(name="otlp", logger=logging.getLogger("b")))
    try:
        started, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(values), batch):
            chunk = values[i:i + batch]
            for value in chunk:  # the runtime validates every value before handing a batch over
                validate_event_bytes(value, "analytics")
            await collector.handle_raw_batch("analytics", LazyEvents("analytics", chunk), chunk)
        return _rates(len(values), started, cpu)
    finally:
        await collector.close()


async def main_async(url: str, count: int, batch: int, rounds: int) -> None:
    values = events(count)
    await run_bare(url, values[:batch], batch)  # warm-up (imports, connections)
    await run_collector(url, values[:batch], batch)
    bare, collector = [], []
    for _ in range(rounds):
        bare.append(await run_bare(url, values, batch))
        collector.append(await run_collector(url, values, batch))
    load = os.getloadavg()
    print(f"{count} events, batches of {batch}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"{os.cpu_count()} cores")
    print("round  bare events/s  collector events/s  bare CPU us/event  collector CPU us/event")
    for i, (b, c) in enumerate(zip(bare, collector, strict=True), 1):
        print(f"{i:>5}  {b[0]:>13,.0f}  {c[0]:>18,.0f}  {b[1]:>17.1f}  {c[1]:>22.1f}")
    wall = statistics.median(c[0] for c in collector) / statistics.median(b[0] for b in bare)
    cpu = statistics.median(b[1] for b in bare) / statistics.median(c[1] for c in collector)
    print(f"collector / bare: {wall:.1%} of the events per second, {cpu:.1%} by CPU per event (medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while not http_ok(f"{url}/healthz") and time.monotonic() < deadline:
            time.sleep(0.1)
        asyncio.run(main_async(url, args.events, args.batch, args.rounds))
    finally:
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    main()
