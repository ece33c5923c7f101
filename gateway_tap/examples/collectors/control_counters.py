"""Receives the request enricher's ``request_counts`` control messages from every tap and exposes
the per-gateway totals as Prometheus metrics on the collector's metrics port.

    gateway-tap collect control-counters --config gateway-tap.yaml

with, in the config file::

    collectors:
      control-counters:
        plugin: gateway_tap.examples.collectors.control_counters:ControlCounters
        metrics: {port: 9310}

Metrics: ``gateway_tap_control_requests_total{gateway_id, llm}`` (requests the taps' enricher
saw) and ``gateway_tap_control_last_report_timestamp_seconds{gateway_id}``. Each report carries
the counts since the previous one, so sums are totals; a redelivered message (same id, after a
crash before the commit) is recognised among the last ``dedupe_window`` ids and not counted twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from collectors.sdk import BadEvents, CollectorServices, DataCollector
from schemas import ControlMessage

KIND = "request_counts"


class ControlCounters(DataCollector):
    config_schema: ClassVar[dict[str, Any]] = {
        "type": "object", "additionalProperties": False,
        "properties": {"dedupe_window": {"type": "integer", "minimum": 0}}}

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        registry = services.metrics if services.metrics is not None else CollectorRegistry()
        self.requests = Counter("gateway_tap_control_requests", "Requests seen by the request enricher, per tap.",
                                ("gateway_id", "llm"), registry=registry)
        self.last_report = Gauge("gateway_tap_control_last_report_timestamp_seconds",
                                 "emitted_at of the newest request_counts report, per tap.", ("gateway_id",),
                                 registry=registry)
        self.window = int(config.get("dedupe_window", 100_000))
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.newest: dict[str, float] = {}

    async def handle_control_batch(self, messages: Sequence[ControlMessage]) -> None:
        rejected: dict[str, str] = {}
        for message in messages:
            if message.kind != KIND or message.id in self.seen:
                continue  # other plugins' messages are not ours to judge
            by_llm = message.payload.get("by_llm")
            if not isinstance(by_llm, dict) or not all(isinstance(v, int) and v >= 0 for v in by_llm.values()):
                rejected[message.id] = "payload.by_llm must map LLM ids to non-negative integers"
                continue
            for llm, count in by_llm.items():
                self.requests.labels(message.gateway_id, str(llm)).inc(count)
            newest = max(self.newest.get(message.gateway_id, 0.0), message.emitted_at.timestamp())
            self.newest[message.gateway_id] = newest
            self.last_report.labels(message.gateway_id).set(newest)
            self.seen[message.id] = None
            if len(self.seen) > self.window:
                self.seen.popitem(last=False)
        if rejected:
            raise BadEvents(rejected)
