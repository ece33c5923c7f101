"""The tap's bound metric children record exactly what prometheus-client's own calls record."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, generate_latest

from gateway_tap.proxy.metrics import BUCKETS, TapMetrics


def test_fast_children_expose_what_labels_inc_and_observe_expose() -> None:
    fast, public = TapMetrics(CollectorRegistry()), TapMetrics(CollectorRegistry())
    rng = random.Random(3)
    values = [*BUCKETS, 0.0, 1e-9, 500.0, *(rng.uniform(0, 3) for _ in range(500))]  # bounds: le is inclusive
    for i, value in enumerate(values):
        app, sc = ("demo", "other")[i % 2], ("2xx", "5xx")[i % 3 == 0]
        c = fast.request_children(app, "openai", "gpt-4o-mini", sc)
        c.requests.inc()
        for histogram in (c.request_seconds, c.upstream_seconds, c.overhead_seconds, c.ttfb_seconds):
            histogram.observe(value)
        c.input_tokens.inc(i)
        c.output_tokens.inc(2 * i)
        c.cost.inc(value / 1000)
        fast.rejected_child("openai", "invalid_api_key").inc()

        public.requests.labels(app, "openai", "gpt-4o-mini", sc).inc()
        public.request_seconds.labels("openai", sc).observe(value)
        for histogram in (public.upstream_seconds, public.overhead_seconds, public.ttfb_seconds):
            histogram.labels("openai").observe(value)
        public.tokens.labels(app, "openai", "gpt-4o-mini", "input").inc(i)
        public.tokens.labels(app, "openai", "gpt-4o-mini", "output").inc(2 * i)
        public.cost.labels(app, "openai", "gpt-4o-mini").inc(value / 1000)
        public.rejected.labels("openai", "invalid_api_key").inc()

    def exposed(m: TapMetrics) -> list[str]:  # without the _created timestamps, which differ by construction
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]

    assert exposed(fast) == exposed(public)
