"""docs/metrics.md is current, and every metric follows the naming and label conventions it states."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway_tap.metrics_docs import MetricDoc, render, sections

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"

# Every label any metric may carry: each has a bounded set of values (config ids, enums, names in code).
BOUNDED_LABELS = {
    "app", "llm", "model", "status_class", "plugin", "hook", "kind", "code", "collector", "type", "topic",
    "partition", "error_class", "reason", "outcome", "result", "period", "threshold",
    "endpoint",  # a plugin endpoint as declared ("GET mcp/{session}"), never the concrete path
    "generation",  # a garbage collector generation: 0, 1 or 2
    "scope",  # a rate limit's scope kind: app, app_llm, app_model, key
    "user",  # a user of the Redis link: ratelimit, kv:<plugin name>
}


def section(title: str) -> list[MetricDoc]:
    return next(docs for name, _, docs in sections() if name == title)


def all_metrics() -> list[MetricDoc]:
    return [d for _, _, docs in sections() for d in docs]


def test_committed_doc_is_current() -> None:
    assert DOC.read_text() == render(), "docs/metrics.md is stale: python -m gateway_tap.metrics_docs > docs/metrics.md"


def test_doc_lists_every_metric_once() -> None:
    text = DOC.read_text()
    names = [m.name for m in all_metrics()]
    assert len(names) == len(set(names)), "a metric is declared by the tap and a collector alike"
    for name in names:
        assert text.count(f"| `{name}` |") == 1, name


@pytest.mark.parametrize("metric", all_metrics(), ids=lambda m: m.name)
def test_naming_conventions(metric: MetricDoc) -> None:
    assert metric.name.startswith("gateway_tap_")
    assert metric.help, "every metric needs a help text"
    if metric.type == "counter":
        assert metric.name.endswith("_total")
    else:
        assert not metric.name.endswith("_total"), "only counters end in _total"
    if metric.type == "histogram" and "duration" in metric.name:
        assert metric.name.endswith("_seconds")
    for unit in ("_milliseconds", "_ms", "_kb", "_mb", "_minutes"):
        assert unit not in metric.name, "base units only (seconds, bytes)"


@pytest.mark.parametrize("metric", all_metrics(), ids=lambda m: m.name)
def test_labels_are_bounded(metric: MetricDoc) -> None:
    assert set(metric.labels) <= BOUNDED_LABELS, f"unexpected label(s): {set(metric.labels) - BOUNDED_LABELS}"


def test_latency_histograms_resolve_overhead_and_long_calls() -> None:
    """Tap latencies: 100 µs buckets for the tap's own overhead and hooks, up to 120 s for LLM calls."""
    latencies = [m for m in section("Tap") if m.type == "histogram" and m.name.endswith("_seconds")
                 and "budget" not in m.name and "redis" not in m.name]  # store/Redis round trips: their own scale
    assert {m.name for m in latencies} >= {
        "gateway_tap_request_duration_seconds", "gateway_tap_upstream_duration_seconds",
        "gateway_tap_upstream_ttfb_seconds", "gateway_tap_overhead_seconds", "gateway_tap_hook_duration_seconds"}
    for metric in latencies:
        assert metric.buckets[0] <= 0.0001 and metric.buckets[-1] >= 120, metric


def test_collector_duration_histograms_span_sub_ms_to_minutes() -> None:
    for metric in section("Collectors"):
        if metric.type == "histogram" and metric.name.endswith("_seconds"):
            assert metric.buckets[-1] >= 120, metric
            if "freshness" not in metric.name:  # freshness is end-to-end: milliseconds at best
                assert metric.buckets[0] <= 0.001, metric


def test_event_loop_lag_spans_the_timer_resolution_to_seconds() -> None:
    """Lag is sampled with a loop timer (1 ms resolution in libuv): buckets from 1 ms to a loop blocked for 10 s."""
    (lag,) = [m for m in section("Every process") if m.name == "gateway_tap_event_loop_lag_seconds"]
    assert lag.buckets[0] == 0.001 and lag.buckets[-1] >= 10
    (pause,) = [m for m in section("Every process") if m.name == "gateway_tap_gc_pause_seconds"]
    assert pause.buckets[0] <= 0.0001 and pause.buckets[-1] >= 1
