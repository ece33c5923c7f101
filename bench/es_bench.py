"""Elasticsearch collector: throughput against a bare ``async_streaming_bulk`` loop, and freshness.

One run, one private noida-db (Kafka + Elasticsearch on free ports), the same documents:

1. produce ``--events`` analytics events (real ``schemas`` JSON) to a topic, read them back
   (raw values + decoded events, as the runtime hands them over);
2. ``collector``: :meth:`ElasticsearchCollector.handle_raw_batch` over batches of
   ``--batch`` events (the runtime's default batch size), default collector settings;
3. ``bare``: ``elasticsearch.helpers.async_streaming_bulk`` over the same documents
   (pre-built ``_source`` dicts, ``chunk_size`` = the collector's ``bulk_max_events``);
4. ``runtime``: ``gateway-tap collect elasticsearch`` (a child process) draining the
   whole topic into a fresh Elasticsearch process: Kafka fetch + decode + collector + commits;
5. freshness: the same child process while ``--rate`` events/s are produced for
   ``--seconds``; every ``--probe-every``-th event is a probe whose first appearance in ``_search``
   results (polled every 100 ms) gives emitted -> searchable.

``--before PATH`` (a checkout of an older commit, e.g. ``git worktree add --detach /tmp/before <commit>``)
repeats phases 4 and 5 with the collector process importing that checkout (``PYTHONPATH``), alternating
with the current code, so before and after come from the same run. ``--in-flight 1,2,4,8`` adds runtime
passes of the current code with those ``max_in_flight_batches``.

Each contender writes into its own index prefix; indices are deleted between passes.

Usage::

    .venv/bin/python bench/es_bench.py [--events 100000] [--rate 1000] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import signal
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from elasticsearch import AsyncElasticsearch
from elasticsearch.helpers import async_streaming_bulk

from collectors.sdk import CollectorServices
from collectors.sinks import es_templates as tpl
from collectors.sinks.elasticsearch import ElasticsearchCollector, EsConfig
from gateway_tap.dev.servers import ManagedProcess, NoidaServer, cli_argv, free_port, http_ok
from schemas import Analytics, decode_event, encode_event, status_class, topic_for
from schemas.events import Event


def make_event(i: int, when: datetime | None = None) -> Analytics:
    return Analytics(gateway_id="bench", request_id=f"r{i}", app_id=f"app-{i % 50}", llm_id=f"llm-{i % 5}",
                     vendor="openai", model=f"model-{i % 7}", prompt_tokens=100 + i % 900, completion_tokens=50,
                     total_tokens=150 + i % 900, cost=0.0001 * (i % 100), latency_ms=100.0 + i % 400,
                     ttft_ms=30.0, status_code=200 if i % 20 else 500, streamed=bool(i % 2),
                     tags={"team": f"t{i % 4}"}, **({"emitted_at": when} if when else {}))


async def produce(bootstrap: str, topic: str, events: list[Analytics]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=1 << 20)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = [await producer.send(topic, encode_event(e), key=(e.app_id or "").encode()) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def read_back(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    values: list[bytes] = []
    try:
        while len(values) < count:
            for recs in (await consumer.getmany(timeout_ms=500, max_records=10_000)).values():
                values.extend(r.value for r in recs)
    finally:
        await consumer.stop()
    return values


async def count_docs(es: AsyncElasticsearch, index: str) -> int:
    if not await es.indices.exists_alias(name=index):
        return 0
    await es.indices.refresh(index=index)
    return int((await es.count(index=index))["count"])


async def open_collector(es_url: str, prefix: str, **config: Any) -> ElasticsearchCollector:
    """A collector (default settings unless overridden); initialising it installs the templates of ``prefix``."""
    collector = ElasticsearchCollector()
    await collector.initialize({"hosts": [es_url], "index_prefix": prefix, **config},
                               CollectorServices(name="elasticsearch", logger=logging.getLogger("bench")))
    return collector


async def bench_collector(es_url: str, prefix: str, events: list[Event], values: list[bytes], batch: int,
                          concurrency: int) -> float:
    collector = await open_collector(es_url, prefix, bulk_concurrency=concurrency)
    started = time.perf_counter()
    for i in range(0, len(events), batch):
        await collector.handle_raw_batch("analytics", events[i:i + batch], values[i:i + batch])
    elapsed = time.perf_counter() - started
    await collector.close()
    return elapsed


async def bench_bare(es_url: str, prefix: str, events: list[Event], values: list[bytes], chunk: int) -> float:
    await (await open_collector(es_url, prefix)).close()  # same templates and mappings, installed untimed
    actions = []
    for event, value in zip(events, values, strict=True):
        source = orjson.loads(value)
        source["status_class"] = status_class(source["status_code"])
        actions.append({"_index": tpl.index_name(prefix, "analytics", event.emitted_at), "_id": event.id,
                        "_source": source})
    async with AsyncElasticsearch(es_url) as es:
        started = time.perf_counter()
        async for ok, info in async_streaming_bulk(es, actions, chunk_size=chunk, raise_on_error=False):
            if not ok:
                raise RuntimeError(f"bare bulk item failed: {info}")
        return time.perf_counter() - started


def collector_process(tmp: Path, bootstrap: str, topic_prefix: str, es_url: str, prefix: str,
                      group_id: str | None = None, pythonpath: str | None = None,
                      extra: dict[str, Any] | None = None) -> ManagedProcess:
    port = free_port()
    section: dict[str, Any] = {"metrics": {"port": port}, "config": {"hosts": [es_url], "index_prefix": prefix},
                               **(extra or {})}
    if group_id:
        section["group_id"] = group_id
    config = {"kafka": {"bootstrap_servers": bootstrap, "topic_prefix": topic_prefix},
              "collectors": {"elasticsearch": section}}
    path = tmp / f"gateway-tap-{prefix}.yaml"
    path.write_text(yaml.safe_dump(config))
    return ManagedProcess("collect-es", cli_argv("collect", "elasticsearch", "--config", str(path)),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
                          log_path=tmp / f"collect-{prefix}.log", stop_signal=signal.SIGTERM, start_timeout=60,
                          env={"PYTHONPATH": pythonpath} if pythonpath else {})


async def runtime_pass(tmp: Path, kafka: NoidaServer, topic_prefix: str, topic: str, label: str,
                       args: argparse.Namespace, pythonpath: str | None, extra: dict[str, Any] | None,
                       with_freshness: bool) -> tuple[float, list[float]]:
    """``gateway-tap collect elasticsearch`` into a fresh Elasticsearch: drain the topic (rate), then freshness."""
    es_server = NoidaServer(data_dir=tmp / f"es-{label}", services=("elasticsearch",),
                            log_path=tmp / f"es-{label}.log")
    await asyncio.to_thread(es_server.start)
    es = AsyncElasticsearch(es_server.es_url)
    prefix = f"rt{label}"
    group = f"{topic_prefix}.collector.es-{label}"
    proc = collector_process(tmp, kafka.bootstrap, topic_prefix, es_server.es_url, prefix, group, pythonpath, extra)
    lags: list[float] = []
    try:
        started = time.perf_counter()
        await asyncio.to_thread(proc.start)
        ready = time.perf_counter()
        finished = await wait_committed(kafka.bootstrap, group, args.events)
        assert await count_docs(es, tpl.alias_name(prefix, "analytics")) >= args.events
        rate = args.events / (finished - ready)
        print(f"runtime {label:12s} {args.events} docs in {finished - ready:6.2f}s = {rate:8.0f} docs/s "
              f"(process start {ready - started:.1f}s not included)", flush=True)
        if with_freshness:
            # Earlier passes' freshness events are on the topic too: drain them first, so the probes measure
            # a caught-up collector, not a backlog.
            await wait_committed(kafka.bootstrap, group, await topic_end(kafka.bootstrap, topic))
            lags = await freshness(kafka.bootstrap, topic, es, tpl.alias_name(prefix, "analytics"), args.rate,
                                   args.seconds, args.probe_every)
            print(f"freshness {label:10s} at {args.rate}/s: p50 {statistics.median(lags) * 1000:.0f} ms, "
                  f"p99 {pct(lags, 99) * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms ({len(lags)} probes)",
                  flush=True)
    finally:
        await asyncio.to_thread(proc.stop)
        await es.close()
        await asyncio.to_thread(es_server.stop)
    return rate, lags


async def topic_end(bootstrap: str, topic: str) -> int:
    """The sum of the topic's end offsets (every record ever produced to it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata partitions_for_topic reads
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(tps)).values())
    finally:
        await consumer.stop()


async def wait_committed(bootstrap: str, group: str, n: int) -> float:
    """When the collector's group has committed ``n`` offsets, i.e. ``n`` events are confirmed indexed.

    Polling the group's offsets, not ``_count``: counting on noida is slow enough to hold back
    the very bulk requests being measured.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        while True:
            offsets = await admin.list_consumer_group_offsets(group)
            if sum(max(0, o.offset) for o in offsets.values()) >= n:
                return time.perf_counter()
            await asyncio.sleep(0.25)
    finally:
        await admin.close()


async def freshness(bootstrap: str, topic: str, es: AsyncElasticsearch, index: str, rate: int,
                    seconds: float, probe_every: int) -> list[float]:
    """Produce ``rate`` events/s for ``seconds``; return emitted -> searchable (s) of every ``probe_every``-th event."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    emitted: dict[str, float] = {}
    found: dict[str, float] = {}
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set() or len(found) < len(emitted):
            # The oldest 500 pending probes: events arrive roughly in order, and a bounded terms
            # query keeps the measurement from loading the server it measures.
            pending = [i for i in emitted if i not in found][:500]
            if pending:
                resp = await es.search(index=index, query={"terms": {"id": pending}}, size=len(pending),
                                       source=False)
                now = time.time()
                for hit in resp["hits"]["hits"]:
                    found.setdefault(hit["_id"], now)
            await asyncio.sleep(0.1)

    poller = asyncio.create_task(poll())
    try:
        start = time.perf_counter()
        n = 0
        total = int(rate * seconds)
        while n < total:
            # Send what is due by now (ticks of 10 ms keep the rate steady without a sleep per event).
            due = min(total, int((time.perf_counter() - start) * rate))
            while n < due:
                event = make_event(n, datetime.now(UTC))
                if n % probe_every == 0:
                    emitted[event.id] = event.emitted_at.timestamp()
                await producer.send(topic, encode_event(event), key=(event.app_id or "").encode())
                n += 1
            await asyncio.sleep(0.01)
        await producer.flush()
        done.set()
        await asyncio.wait_for(poller, 300)
    finally:
        await producer.stop()
        poller.cancel()
    return [found[i] - emitted[i] for i in emitted]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="es-bench-"))
    # Separate processes, and a fresh Elasticsearch for the pipeline phases: noida snapshots its whole
    # state every ~2 s, so a server still holding the earlier passes (or the Kafka log) gets slower.
    kafka = NoidaServer(data_dir=tmp / "kafka", services=("kafka",), log_path=tmp / "kafka.log")
    es_server = NoidaServer(data_dir=tmp / "es1", services=("elasticsearch",), log_path=tmp / "es1.log")
    await asyncio.to_thread(kafka.start)
    await asyncio.to_thread(es_server.start)
    proc: ManagedProcess | None = None
    run = uuid.uuid4().hex[:6]
    topic_prefix = f"b{run}"
    topic = topic_for("analytics", topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, args.partitions, 1)] +
                              [NewTopic(topic_for(t, topic_prefix), 1, 1) for t in ("proxy_log", "budget_usage")])
    await admin.close()
    es = AsyncElasticsearch(es_server.es_url)
    try:
        events_in = [make_event(i) for i in range(args.events)]
        produce_s = await produce(kafka.bootstrap, topic, events_in)
        values = await read_back(kafka.bootstrap, topic, args.events)
        events = [decode_event(v, "analytics") for v in values]
        avg_bytes = sum(map(len, values)) / len(values)
        chunk = EsConfig().bulk_max_events

        results: dict[str, list[float]] = {"bare": [], "collector": []}
        for n, name in enumerate(x for x in args.order.split(",") if x):
            prefix = f"{name}{n}{run}"
            if name == "collector":
                elapsed = await bench_collector(es_server.es_url, prefix, events, values, args.batch,
                                                args.concurrency)
            else:
                elapsed = await bench_bare(es_server.es_url, prefix, events, values, chunk)
            indexed = await count_docs(es, tpl.alias_name(prefix, "analytics"))
            assert indexed == args.events, f"{name}: {indexed} of {args.events} documents"
            results[name].append(args.events / elapsed)
            print(f"{name:10s} {args.events} docs in {elapsed:6.2f}s = {args.events / elapsed:8.0f} docs/s",
                  flush=True)
            # Wildcard deletes are refused by default (action.destructive_requires_name): name each index.
            names = list((await es.indices.get_alias(name=tpl.alias_name(prefix, "analytics"))).body)
            await es.indices.delete(index=",".join(names))
        await es.close()
        await asyncio.to_thread(es_server.stop)
        es_server = None  # type: ignore[assignment]
        # Freshness events land on the same topic: later passes drain those too, so each pass has its own
        # group and waits for the first ``--events`` offsets only (the rate is over the backlog).
        passes: list[tuple[str, str | None, dict[str, Any] | None, bool]] = []
        for round_ in range(args.rounds):
            pair = [(f"after{round_}", None, None, round_ == 0)]
            if args.before:
                pair.insert(0, (f"before{round_}", args.before, None, round_ == 0))
            # Later passes index into a topic holding the earlier passes' freshness events too: alternate
            # which version goes first (``--after-first`` for round 0).
            passes.extend(reversed(pair) if (round_ % 2 == 1) != args.after_first else pair)
        for n in (int(x) for x in args.in_flight.split(",") if x):
            passes.append((f"inflight{n}", None, {"max_in_flight_batches": n}, False))
        runtime: dict[str, list[float]] = {}
        fresh: dict[str, list[float]] = {}
        for label, pythonpath, extra, with_freshness in passes:
            rate, lags = await runtime_pass(tmp, kafka, topic_prefix, topic, label, args, pythonpath, extra,
                                            with_freshness)
            key = label.rstrip("0123456789") if not label.startswith("inflight") else label
            runtime.setdefault(key, []).append(rate)
            if lags:
                fresh[key] = lags
    finally:
        if proc is not None:
            await asyncio.to_thread(proc.stop)
        await es.close()
        if es_server is not None:
            await asyncio.to_thread(es_server.stop)
        await asyncio.to_thread(kafka.stop)

    bare = statistics.mean(results["bare"]) if results["bare"] else float("nan")
    collector = statistics.mean(results["collector"]) if results["collector"] else float("nan")
    ratio = collector / bare
    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpu, Python {platform.python_version()}, noida-db 0.2.3")
    print(f"events: {args.events} analytics, {avg_bytes:.0f} B each, {args.partitions} partitions; "
          f"produced in {produce_s:.1f}s")
    print("| contender | docs/s | vs bare |")
    print("|---|---:|---:|")
    print(f"| bare `async_streaming_bulk` (chunk {chunk}) | {bare:.0f} | 100% |")
    print(f"| collector `handle_raw_batch` (batches of {args.batch}, concurrency {args.concurrency}) | "
          f"{collector:.0f} | {ratio:.0%} |")
    for key, rates in runtime.items():
        rate = statistics.mean(rates)
        print(f"| `gateway-tap collect elasticsearch` {key} (Kafka -> ES, fresh server, {len(rates)} pass(es)) | "
              f"{rate:.0f} | {rate / bare:.0%} |")
    for key, lags in fresh.items():
        print(f"freshness {key} at {args.rate} events/s for {args.seconds:.0f}s ({len(lags)} probes): "
              f"p50 {statistics.median(lags) * 1000:.0f} ms, p99 {pct(lags, 99) * 1000:.0f} ms, "
              f"max {max(lags) * 1000:.0f} ms")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=5000, help="events per handed-over batch")
    parser.add_argument("--concurrency", type=int, default=EsConfig().bulk_concurrency,
                        help="the collector's bulk_concurrency")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rate", type=int, default=1000, help="events/s in the freshness phase")
    parser.add_argument("--probe-every", type=int, default=50,
                        help="every Nth event is a freshness probe (searching is costly on noida: keep probes few)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the freshness phase")
    parser.add_argument("--before", help="a checkout of the older code: its runtime passes alternate with ours")
    parser.add_argument("--rounds", type=int, default=1, help="runtime passes per version (alternating)")
    parser.add_argument("--after-first", action="store_true", help="round 0 runs the current code first")
    parser.add_argument("--in-flight", default="", help="extra runtime passes with these max_in_flight_batches")
    parser.add_argument("--order", default="bare,collector,collector,bare",
                        help="contenders, in order (rates are averaged per contender)")
    return parser.parse_args()


def _run(args: Any) -> None:
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))


if __name__ == "__main__":
    _run(parse_args())
