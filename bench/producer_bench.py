"""Kafka producers side by side for the tap's publisher: aiokafka vs confluent-kafka (librdkafka), by codec.

Both with the publisher's guarantees: idempotent, acks=all, linger ``--linger-ms``, every message's acknowledgement
awaited (as ``EventPublisher._send_group`` does). Messages are the tap's three events of a request
(~1.6 KB together, key = app id, the two headers), against a local noida-db broker:

* ``paced``: ``--rate`` messages/s for ``--seconds`` (the tap at rate/3 requests/s), sent in the publisher's
  pattern (whatever is queued goes as one group, acks awaited before the next group);
* CPU per message of the whole process (every thread) and of the event-loop thread alone: the tap's
  requests wait on the loop thread, librdkafka's batching, compression and I/O run in its own threads;
  the ``null`` row is the harness alone (pacing and grouping, no producer), included in every other row;
  the process's CPU split further into librdkafka's threads (``rdk:*``) and the other threads besides the
  loop (the publisher's Kafka thread, the ``confluent`` row's poll thread), from ``/proc`` clock ticks.

confluent-kafka is driven two ways: ``confluent``, a delivery callback per message and a poll thread resolving
each group's futures with one ``call_soon_threadsafe``; ``publisher``, the publisher's own Kafka half
(``gateway_tap.publisher.kafka``: ``delivery.report.only.error``, one thread flushing each group).

    .venv/bin/pip install -e '.[dev]'
    .venv/bin/python -m bench.producer_bench [--rate 3000] [--seconds 8] [--codecs gzip,lz4,zstd,none]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gateway_tap.dev.servers import NoidaServer

Message = tuple[str, bytes, bytes, list[tuple[str, bytes]]]
LINGER_MS = 5
"""Every client's linger (``--linger-ms``)."""


def messages(prefix: str, n: int) -> list[Message]:
    """n messages cycling through a proxy_log, an analytics and a budget_usage event of realistic size."""
    headers = {kind: [("type", kind.encode()), ("schema_version", b"1")]
               for kind in ("proxy_log", "analytics", "budget_usage")}
    out: list[Message] = []
    for i in range(n):
        kind = ("proxy_log", "analytics", "budget_usage")[i % 3]
        app = f"app-{i % 8}"
        body: dict[str, Any] = {"type": kind, "id": f"0193a5b2-{i:04x}-7000-8000-{i:012x}", "schema_version": 1,
                                "emitted_at": "2026-12-03T10:00:00.123456Z", "gateway_id": "bench",
                                "request_id": f"req_0193a5b2{i:024x}", "app_id": app, "llm_id": "openai"}
        if kind == "proxy_log":
            body.update(method="POST", path="/llm/openai/v1/chat/completions", vendor="openai", status_code=200,
                        request_bytes=99, response_bytes=301, streamed=False,
                        latency={"total_ms": 1.93, "upstream_ms": 1.2, "ttfb_ms": 1.1, "tap_overhead_ms": 0.73},
                        request_headers={"host": "127.0.0.1:8080", "content-type": "application/json",
                                         "authorization": "[REDACTED]", "content-length": "99"},
                        response_headers={"content-type": "application/json", "x-request-id": body["request_id"],
                                          "x-served-by": "gateway-tap"},
                        client_address="127.0.0.1", metadata={"team": "demo"})
        elif kind == "analytics":
            body.update(vendor="openai", model="gpt-4o-mini", prompt_tokens=3, completion_tokens=4, total_tokens=7,
                        tokens_estimated=False, cost=2.85e-6, currency="USD", latency_ms=1.93, ttft_ms=1.5,
                        upstream_ms=1.2, status_code=200, streamed=False, choices=1, tool_calls=0, cache_hit=False,
                        tags={"team": "demo"})
        else:
            body.update(model="gpt-4o-mini", prompt_tokens=3, completion_tokens=4, total_tokens=7, cost=2.85e-6,
                        currency="USD", period="daily", period_start="2026-12-03", requests=1)
        out.append((f"{prefix}.{kind}", orjson.dumps(body), app.encode(), headers[kind]))
    return out


class KeyPartitioner:
    """aiokafka's default partitioner with its choice for a key memoized per partition count (what the publisher
    used with aiokafka: murmur2 in pure Python was a third of ``AIOKafkaProducer.send`` per message)."""

    def __init__(self, max_keys: int = 10_000) -> None:
        from aiokafka.partitioner import DefaultPartitioner, murmur2

        self._murmur2 = murmur2
        self._memo: dict[tuple[bytes, int], int] = {}
        self._max_keys = max_keys
        self._random = DefaultPartitioner()

    def __call__(self, key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
        if key is None:
            return self._random(key, all_partitions, available)  # type: ignore[no-any-return]
        memo_key = (key, len(all_partitions))
        index = self._memo.get(memo_key)
        if index is None:
            index = (self._murmur2(key) & 0x7FFFFFFF) % len(all_partitions)
            if len(self._memo) >= self._max_keys:
                self._memo.clear()
            self._memo[memo_key] = index
        return all_partitions[index]


class NullSender:
    """The harness alone (pacing, queue, groups): its CPU is in every other row too."""

    def __init__(self, bootstrap: str, codec: str) -> None:
        pass

    async def start(self) -> None:
        pass

    async def send_group(self, group: list[Message]) -> None:
        await asyncio.sleep(0)

    async def stop(self) -> None:
        pass


class AioKafkaSender:
    def __init__(self, bootstrap: str, codec: str, memo_partitioner: bool = False) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.partitioner import DefaultPartitioner

        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                         compression_type=None if codec == "none" else codec, linger_ms=LINGER_MS,
                                         max_batch_size=1024 * 1024, max_request_size=1024 * 1024,
                                         partitioner=KeyPartitioner() if memo_partitioner else DefaultPartitioner())


    async def start(self) -> None:
        await self.producer.start()

    async def send_group(self, group: list[Message]) -> None:
        futures = [await self.producer.send(topic, value, key=key, headers=headers)
                   for topic, value, key, headers in group]
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        await self.producer.stop()


class AioKafkaMemoSender(AioKafkaSender):
    """aiokafka as the publisher configures it: the memoized key partitioner."""

    def __init__(self, bootstrap: str, codec: str) -> None:
        super().__init__(bootstrap, codec, memo_partitioner=True)


class AioKafkaBatchSender(AioKafkaSender):
    """aiokafka with the group split into one ``BatchBuilder`` per partition (``send_batch``): one future per
    batch instead of one ``send()`` coroutine and future per message; partitions from the same partitioner."""

    def __init__(self, bootstrap: str, codec: str) -> None:
        super().__init__(bootstrap, codec, memo_partitioner=True)
        self.partitioner = KeyPartitioner()

    async def send_group(self, group: list[Message]) -> None:
        producer = self.producer
        partitions: dict[str, list[int]] = {}
        batches: dict[tuple[str, int], Any] = {}
        futures = []
        for topic, value, key, headers in group:
            all_partitions = partitions.get(topic)
            if all_partitions is None:
                all_partitions = partitions[topic] = sorted(await producer.partitions_for(topic))
            tp = (topic, self.partitioner(key, all_partitions, all_partitions))
            batch = batches.get(tp)
            if batch is None:
                batch = batches[tp] = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await producer.send_batch(batch, tp[0], partition=tp[1]))
                batch = batches[tp] = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None, headers=headers)
        for (topic, partition), batch in batches.items():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*futures)


class ConfluentSender:
    def __init__(self, bootstrap: str, codec: str) -> None:
        from confluent_kafka import Producer

        self.producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                                  "compression.type": codec, "linger.ms": LINGER_MS, "message.timeout.ms": 10_000,
                                  "batch.size": 1024 * 1024})
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._done: list[tuple[asyncio.Future[None], Any]] = []

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)
            if self._done:
                done, self._done = self._done, []
                assert self.loop is not None
                self.loop.call_soon_threadsafe(_resolve, done)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread.start()

    async def send_group(self, group: list[Message]) -> None:
        assert self.loop is not None
        futures = []
        for topic, value, key, headers in group:
            fut = self.loop.create_future()
            self.producer.produce(topic, value, key, headers=headers,
                                  on_delivery=lambda err, msg, fut=fut: self._done.append((fut, err)))
            futures.append(fut)
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        await asyncio.to_thread(self.producer.flush, 10)
        self._stop.set()
        self._thread.join()


class PublisherSender:
    """The publisher's own Kafka half (``gateway_tap.publisher.kafka.GroupProducer``): ``produce()`` on the loop,
    ``delivery.report.only.error`` (no Python callback per acknowledged message), one Kafka thread flushing each
    group and handing the verdict back once per group."""

    def __init__(self, bootstrap: str, codec: str) -> None:
        from gateway_tap.publisher.kafka import GroupProducer
        from gateway_tap.settings import KafkaSettings, PublisherSettings

        self.producer = GroupProducer(KafkaSettings(bootstrap_servers=bootstrap),  # type: ignore[call-arg]
                                      PublisherSettings(compression=codec, linger_ms=LINGER_MS))  # type: ignore[call-arg,arg-type]
        self.timestamp_ms = int(time.time() * 1000)

    async def start(self) -> None:
        await self.producer.probe(10)

    async def send_group(self, group: list[Message]) -> None:
        from gateway_tap.publisher.spool import Message as SpoolMessage

        result = await self.producer.send([SpoolMessage(topic, value, key, headers, self.timestamp_ms)
                                           for topic, value, key, headers in group], 10)
        if result.retry or result.rejected:
            raise RuntimeError(f"{len(result.retry)} not acknowledged, {len(result.rejected)} rejected")

    async def stop(self) -> None:
        await self.producer.close(10)


def _resolve(done: list[tuple[asyncio.Future[None], Any]]) -> None:
    for fut, err in done:
        if not fut.done():
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(RuntimeError(str(err)))


def thread_cpu_s() -> dict[tuple[str, str], float]:
    """CPU seconds of each live thread of this process, by (thread id, name) (Linux ``/proc``)."""
    out: dict[tuple[str, str], float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        out[(tid, name)] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


async def paced(make: Callable[[], Any], msgs: list[Message], rate: int, seconds: float) -> dict[str, float]:
    """Send ``rate`` messages/s in the publisher's pattern; CPU per message of the process and the loop thread."""
    sender = make()
    await sender.start()
    await sender.send_group(msgs[:300])  # connect, metadata, producer id
    queue: list[Message] = []
    wake = asyncio.Event()
    sent = 0

    async def drain() -> None:
        nonlocal sent
        while True:
            await wake.wait()
            wake.clear()
            if not queue:
                continue
            group = queue[:]
            queue.clear()
            await sender.send_group(group)
            sent += len(group)

    task = asyncio.create_task(drain())
    total = int(rate * seconds)
    threads0 = thread_cpu_s()
    cpu0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    tick = 0.001
    i = 0
    while i < total:
        due = int((time.perf_counter() - wall0) * rate)
        while i < min(due, total):
            queue.append(msgs[i % len(msgs)])
            i += 1
        wake.set()
        await asyncio.sleep(tick)
    while sent < total:
        wake.set()
        await asyncio.sleep(0.005)
    cpu1, thread1, wall1 = time.process_time(), time.thread_time(), time.perf_counter()
    threads1 = thread_cpu_s()  # before stop(): librdkafka's threads end with the producer
    task.cancel()
    await sender.stop()
    # librdkafka names its threads rdk:main, rdk:broker<N>, ...; the others besides the loop are ours (the
    # publisher's Kafka thread, the poll thread) or the executor's. Clock ticks: coarser than the columns above.
    loop_tid = str(threading.get_native_id())
    rdk = other = 0.0
    for key, cpu in threads1.items():
        delta = cpu - threads0.get(key, 0.0)
        if key[1].startswith("rdk:"):
            rdk += delta
        elif key[0] != loop_tid:
            other += delta
    return {"process_us": (cpu1 - cpu0) / total * 1e6, "loop_us": (thread1 - thread0) / total * 1e6,
            "librdkafka_us": rdk / total * 1e6, "other_threads_us": other / total * 1e6,
            "achieved": total / (wall1 - wall0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=3000, help="Messages per second (3 per tap request).")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--codecs", default="gzip,lz4,zstd,none")
    parser.add_argument("--linger-ms", type=int, default=5, help="Every client's linger.ms.")
    parser.add_argument("--clients", default="null,aiokafka,aiokafka-memo,aiokafka-batch,confluent,publisher",
                        help="null (the harness), aiokafka (send per message), aiokafka-memo (+ memoized partitioner: "
                             "the publisher before the switch), aiokafka-batch (send_batch per partition), confluent "
                             "(a delivery callback per message, a poll thread), publisher (the publisher's own Kafka "
                             "half on confluent-kafka, as the tap runs it)")
    args = parser.parse_args()
    global LINGER_MS
    LINGER_MS = args.linger_ms
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        server = NoidaServer(data_dir=tmp / "noida", services=("kafka",), log_path=tmp / "noida.log")
        with ThreadPoolExecutor(1) as pool:
            pool.submit(server.start).result()
        rows = []
        try:
            for codec in args.codecs.split(","):
                for client in args.clients.split(","):
                    if client == "null" and codec != args.codecs.split(",")[0]:
                        continue  # one harness row is enough
                    cls = {"null": NullSender, "aiokafka": AioKafkaSender, "aiokafka-memo": AioKafkaMemoSender,
                           "aiokafka-batch": AioKafkaBatchSender,
                           "confluent": ConfluentSender, "publisher": PublisherSender}[client]
                    msgs = messages(f"{client}-{codec}", 3000)
                    try:
                        r = asyncio.run(paced(lambda cls=cls, codec=codec: cls(server.bootstrap, codec), msgs,
                                              args.rate, args.seconds))
                    except Exception as exc:  # e.g. a codec the broker or client does not support
                        print(f"{client} {codec}: failed: {exc!r}", flush=True)
                        continue
                    rows.append((client, codec, r))
                    print(client, codec, {k: round(v, 1) for k, v in r.items()}, flush=True)
        finally:
            server.stop()
    print(f"\nlinger {args.linger_ms} ms, {args.seconds:g} s per row")
    print(f"\n| client | codec | CPU µs/message, whole process | event-loop thread | librdkafka's threads | "
          f"other threads | achieved msg/s (target {args.rate}) |")
    print("|---|---|---|---|---|---|---|")
    for client, codec, r in rows:
        print(f"| {client} | {codec} | {r['process_us']:.1f} | {r['loop_us']:.1f} | {r['librdkafka_us']:.1f} | "
              f"{r['other_threads_us']:.1f} | {r['achieved']:,.0f} |")


if __name__ == "__main__":
    main()
