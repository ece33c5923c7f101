"""Prometheus metrics of the tap (``gateway_tap_`` prefix, units in names, bounded labels only).

Labels are the configured app and LLM ids, the model (the price entry it resolves to: its config key or
the catalog's model id, else ``other``) and the status class (``2xx``...). Never request or user ids.
With several workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before any worker starts
and ``/metrics`` aggregates every worker's files.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway_tap.eventloop import LoopMetrics
from gateway_tap.fast_metrics import FastCounter, FastHistogram
from gateway_tap.plugins.chain import LATENCY_BUCKETS as BUCKETS
from gateway_tap.plugins.chain import HookMetrics


class RequestChildren:
    """The request metrics of one label combination, bound once (``labels()`` is not free, nor is ``observe``)."""

    __slots__ = ("cost", "input_tokens", "output_tokens", "overhead_seconds", "request_seconds", "requests",
                 "ttfb_seconds", "upstream_seconds")

    def __init__(self, requests: Counter, request_seconds: Histogram, upstream_seconds: Histogram,
                 overhead_seconds: Histogram, ttfb_seconds: Histogram, input_tokens: Counter, output_tokens: Counter,
                 cost: Counter) -> None:
        self.requests = FastCounter(requests)
        self.request_seconds = FastHistogram(request_seconds)
        self.upstream_seconds = FastHistogram(upstream_seconds)
        self.overhead_seconds = FastHistogram(overhead_seconds)
        self.ttfb_seconds = FastHistogram(ttfb_seconds)
        self.input_tokens = FastCounter(input_tokens)
        self.output_tokens = FastCounter(output_tokens)
        self.cost = FastCounter(cost)


class TapMetrics:
    """Every metric the proxy and the hook chain record, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_tap_requests", "Requests handled, by outcome.",
                                ["app", "llm", "model", "status_class"], registry=r)
        self.request_seconds = Histogram("gateway_tap_request_duration_seconds", "Total time per request.",
                                         ["llm", "status_class"], buckets=BUCKETS, registry=r)
        self.upstream_seconds = Histogram("gateway_tap_upstream_duration_seconds",
                                          "Time spent waiting on the upstream.", ["llm"], buckets=BUCKETS,
                                          registry=r)
        self.ttfb_seconds = Histogram("gateway_tap_upstream_ttfb_seconds", "Time to the upstream's first byte.",
                                      ["llm"], buckets=BUCKETS, registry=r)
        self.overhead_seconds = Histogram("gateway_tap_overhead_seconds",
                                          "Time the tap added (total minus upstream).", ["llm"], buckets=BUCKETS,
                                          registry=r)
        self.tokens = Counter("gateway_tap_tokens", "Tokens consumed.", ["app", "llm", "model", "kind"],
                              registry=r)
        self.loop = LoopMetrics(r)
        self.cost = Counter("gateway_tap_cost_usd", "Cost of the calls in the LLM's currency.",
                            ["app", "llm", "model"], registry=r)
        self.rejected = Counter("gateway_tap_rejected_requests", "Requests the tap answered itself.",
                                ["llm", "code"], registry=r)
        self.endpoint_requests = Counter("gateway_tap_endpoint_requests", "Calls of plugin endpoints, by outcome.",
                                         ["plugin", "endpoint", "status_class"], registry=r)
        self.endpoint_seconds = Histogram("gateway_tap_endpoint_duration_seconds",
                                          "Total time per plugin endpoint call (a streamed one: to its end).",
                                          ["plugin", "endpoint"], buckets=BUCKETS, registry=r)
        self.hooks = HookMetrics(r)
        self._children: dict[tuple[str, str, str, str], RequestChildren] = {}
        self._rejected: dict[tuple[str, str], FastCounter] = {}

    def request_children(self, app: str, llm: str, model: str, sc: str) -> RequestChildren:
        """The metric children for one label combination, resolved once (labels() is not free)."""
        key = (app, llm, model, sc)
        children = self._children.get(key)
        if children is None:
            children = RequestChildren(
                self.requests.labels(app, llm, model, sc), self.request_seconds.labels(llm, sc),
                self.upstream_seconds.labels(llm), self.overhead_seconds.labels(llm), self.ttfb_seconds.labels(llm),
                self.tokens.labels(app, llm, model, "input"), self.tokens.labels(app, llm, model, "output"),
                self.cost.labels(app, llm, model))
            self._children[key] = children
        return children

    def rejected_child(self, llm: str, code: str) -> FastCounter:
        """``gateway_tap_rejected_requests_total`` for one LLM label and error code, bound once."""
        key = (llm, code)
        child = self._rejected.get(key)
        if child is None:
            child = FastCounter(self.rejected.labels(llm, code))
            if len(self._rejected) < 1000:  # codes come from plugins too: keep the table bounded
                self._rejected[key] = child
        return child

    def exposition(self) -> bytes:
        """The text exposition format: all workers' values in multiprocess mode, else this registry's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
