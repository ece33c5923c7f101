"""Prometheus metrics of a collector worker (prefix ``gateway_tap_collector_``) and their HTTP server."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway_tap.eventloop import LoopMetrics
from schemas import EVENT_TYPES, EventType

PREFIX = "gateway_tap_collector_"
FRESHNESS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 50_000)
# Sub-millisecond (an in-memory sink) to two minutes (a bulk request retried with backoff).
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class CollectorMetrics:
    """Every metric of one collector worker, on its own registry (so several can live in one process)."""

    def __init__(self, collector: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.collector = collector
        r = self.registry
        labels = ("collector", "type")
        self.consumed = Counter(PREFIX + "events_consumed", "Events read from Kafka.", labels, registry=r)
        self.handled = Counter(PREFIX + "events_handled", "Events handled and flushed by the collector.",
                               labels, registry=r)
        self.dead_lettered = Counter(PREFIX + "events_dead_lettered", "Events published to <topic>.dlq.",
                                     (*labels, "error_class"), registry=r)
        self.batch_size = Histogram(PREFIX + "batch_size", "Events per batch.", ("collector",),
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.batch_duration = Histogram(PREFIX + "batch_duration_seconds",
                                        "Time from a batch's hand-over to its commit.", ("collector",),
                                        buckets=DURATION_BUCKETS, registry=r)
        self.retries = Counter(PREFIX + "retries", "Retries of a batch after a retriable failure.",
                               ("collector",), registry=r)
        self.lag = Gauge(PREFIX + "consumer_lag", "High-water mark minus the next offset to handle.",
                         ("collector", "topic", "partition"), registry=r)
        self.freshness = Histogram(PREFIX + "freshness_seconds",
                                   "Handling time minus the event's emitted_at (sampled per batch).",
                                   labels, buckets=FRESHNESS_BUCKETS, registry=r)
        self.loop = LoopMetrics(r, ("collector",))
        # Bound children: label lookups are too slow for per-batch use at 100k events/s.
        self.consumed_by_type = {t: self.consumed.labels(collector, t) for t in EVENT_TYPES}
        self.handled_by_type = {t: self.handled.labels(collector, t) for t in EVENT_TYPES}
        self.freshness_by_type = {t: self.freshness.labels(collector, t) for t in EVENT_TYPES}
        self.batch_size_c = self.batch_size.labels(collector)
        self.batch_duration_c = self.batch_duration.labels(collector)
        self.retries_c = self.retries.labels(collector)

    def dead_letter(self, event_type: EventType | str, error_class: str) -> None:
        self.dead_lettered.labels(self.collector, event_type, error_class).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(metrics: CollectorMetrics, host: str, port: int, healthy: Callable[[], bool]) -> web.AppRunner:
    """Start ``/metrics`` and ``/healthz`` on ``host:port``; returns the aiohttp runner (call ``cleanup()``).

    ``healthy`` is a zero-argument callable: ``/healthz`` answers 200 while it returns True, 503 otherwise.
    """
    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health_view(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "unhealthy\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
