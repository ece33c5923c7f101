"""The Grafana dashboards, built in code with grafana-foundation-sdk (Grafana's own typed builders).

Regenerate the committed JSON after a change here::

    python -m dashboards.generate            # writes dashboards/grafana/json/*.json
    python -m dashboards.generate --check    # exit 1 when the committed JSON is stale

Every Prometheus query uses only metrics the code registers (``docs/metrics.md``);
``tests/dashboards/test_dashboards_live.py`` evaluates each of them against a live Prometheus that scrapes a
live tap and live collectors. Data source uids match ``grafana/provisioning/datasources``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

from grafana_foundation_sdk.builders import bargauge, elasticsearch, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.builders.dashboard import Dashboard, QueryVariable, Row, ThresholdsConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.elasticsearch import TermsOrder

JSON_DIR = Path(__file__).resolve().parent / "grafana" / "json"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="prometheus")
ELASTICSEARCH = DataSourceRef(type_val="elasticsearch", uid="elasticsearch")
QUANTILES = (0.5, 0.95, 0.99)
TAGS = ["gateway-tap"]


Panel = timeseries.Panel | stat.Panel | table.Panel | bargauge.Panel


def prom(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(PROMETHEUS)
    if legend:
        query = query.legend_format(legend)
    return query.instant() if instant else query.range()


def quantile_queries(metric: str, selector: str = "", by: Sequence[str] = ()) -> list[prometheus.Dataquery]:
    """p50/p95/p99 of a histogram, one query each, optionally split by labels."""
    group = ", ".join(("le", *by))
    suffix = "".join(f" {{{{{label}}}}}" for label in by)
    return [prom(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{selector}[$__rate_interval])))",
                 f"p{round(q * 100)}{suffix}", ref=chr(ord("A") + i)) for i, q in enumerate(QUANTILES)]


def series(title: str, unit: str, queries: Sequence[prometheus.Dataquery], description: str = "",
           *, stack: bool = False) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).description(description).datasource(PROMETHEUS).unit(unit)
    if stack:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(30)
    for query in queries:
        panel = panel.with_target(query)
    return panel


def percent_thresholds() -> ThresholdsConfig:
    return ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
        [Threshold(None, "green"), Threshold(0.8, "orange"), Threshold(1.0, "red")])


def variable(name: str, label: str, metric: str) -> QueryVariable:
    """A multi-value label filter with "All" (``.*``), fed by the label's current values."""
    return (QueryVariable(name).label(label).datasource(PROMETHEUS).query(f"label_values({metric}, {name})")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


class Board:
    """One dashboard: rows and panels in reading order, each with a stable id."""

    def __init__(self, uid: str, title: str, description: str, variables: Sequence[QueryVariable] = ()) -> None:
        self.dashboard = (Dashboard(title).uid(uid).description(description).tags(TAGS).refresh("30s")
                          .time("now-1h", "now").timezone("browser").tooltip(DashboardCursorSync.CROSSHAIR)
                          .readonly())
        for var in variables:
            self.dashboard = self.dashboard.with_variable(var)
        self._ids: Iterator[int] = itertools.count(1)

    def row(self, title: str) -> Self:
        self.dashboard = self.dashboard.with_row(Row(title).id(next(self._ids)))
        return self

    def add(self, panel: Panel, width: int = 12, height: int = 8) -> Self:
        self.dashboard = self.dashboard.with_panel(panel.id(next(self._ids)).span(width).height(height))
        return self


# ------------------------------------------------------------------------------------------ Tap

def tap() -> Board:
    req = '{app=~"$app", llm=~"$llm"}'
    llm = '{llm=~"$llm"}'
    b = Board("gateway-tap-tap", "gateway-tap / Tap",
              "The proxy: traffic, latency, the tap's own overhead, plugin hooks and event publishing.",
              [variable("llm", "LLM", "gateway_tap_requests_total"),
               variable("app", "App", "gateway_tap_requests_total")])
    b.row("Traffic")
    b.add(series("Requests/s by status class", "reqps",
                 [prom(f"sum by (status_class) (rate(gateway_tap_requests_total{req}[$__rate_interval]))",
                       "{{status_class}}")], "Every request the tap answered, upstream errors included.", stack=True))
    b.add(series("Requests/s by LLM and app", "reqps",
                 [prom(f"sum by (llm, app) (rate(gateway_tap_requests_total{req}[$__rate_interval]))",
                       "{{llm}} / {{app}}")]))
    b.add(series("Answered by the tap itself, by code", "reqps",
                 [prom(f"sum by (code) (rate(gateway_tap_rejected_requests_total{llm}[$__rate_interval]))",
                       "{{code}}")],
                 "Requests that never reached the upstream: authentication, plugin blocks, budgets, bad requests."))
    b.add(stat.Panel().title("5xx share (5m)").datasource(PROMETHEUS).unit("percentunit")
          .thresholds(ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps(
              [Threshold(None, "green"), Threshold(0.05, "red")]))
          .with_target(prom(f'sum(rate(gateway_tap_requests_total{{status_class="5xx", app=~"$app", llm=~"$llm"}}[5m]))'
                            f" / sum(rate(gateway_tap_requests_total{req}[5m]))", instant=True)), width=12)
    b.row("Latency")
    b.add(series("Request latency", "s", quantile_queries("gateway_tap_request_duration_seconds", llm),
                 "Client-observed time per request (streamed responses: until the last chunk)."))
    b.add(series("Tap overhead", "s", quantile_queries("gateway_tap_overhead_seconds", llm),
                 "Total time minus time waiting on the upstream: hooks, accounting and proxying."))
    b.add(series("Upstream latency by LLM", "s",
                 quantile_queries("gateway_tap_upstream_duration_seconds", llm, ["llm"])))
    b.add(series("Time to first byte by LLM", "s",
                 quantile_queries("gateway_tap_upstream_ttfb_seconds", llm, ["llm"]),
                 "From sending the request upstream to its first response byte."))
    b.add(series("Event-loop lag p99 by worker", "s",
                 [prom('histogram_quantile(0.99, sum by (le, instance) '
                       '(rate(gateway_tap_event_loop_lag_seconds_bucket{collector=""}[$__rate_interval])))',
                       "{{instance}}")],
                 "How late each tap's loop ran a timer that was due: a stalled loop (a blocking hook, a long "
                 "garbage collection) shows here first. loop_monitor.log_stalls_over_ms names the culprit."))
    b.row("Plugins")
    b.add(series("Hook latency p95 by plugin and hook", "s",
                  [prom("histogram_quantile(0.95, sum by (le, plugin, hook) "
                        "(rate(gateway_tap_hook_duration_seconds_bucket[$__rate_interval])))", "{{plugin}} {{hook}}")]))
    b.add(series("Hook latency p99 by plugin and hook", "s",
                  [prom("histogram_quantile(0.99, sum by (le, plugin, hook) "
                        "(rate(gateway_tap_hook_duration_seconds_bucket[$__rate_interval])))", "{{plugin}} {{hook}}")]))
    b.row("Rate limits")
    b.add(series("Rate-limit decisions/s by result", "ops",
                 [prom("sum by (result) (rate(gateway_tap_ratelimit_decisions_total[$__rate_interval]))",
                       "{{result}}")],
                 "allowed, limited (429 rate_limit_exceeded), and what Redis being away decided (shared mode)."))
    b.add(series("Refused by rate limits/s by scope and counter", "reqps",
                  [prom("sum by (scope, kind) (rate(gateway_tap_ratelimit_limited_total[$__rate_interval]))",
                        "{{scope}} {{kind}}")],
                 "Which limits bind: app, app x LLM, app x model or key; requests, tokens or in flight."))
    b.add(series("Redis round trips (shared rate limits, plugin KV)", "s",
                 quantile_queries("gateway_tap_redis_command_seconds", by=("user",)),
                 "One per rate-limited request in shared mode; settlements are pipelined."))
    b.add(series("Redis reachable", "short", [prom("min by (instance) (gateway_tap_redis_up)", "{{instance}}")],
                 "0 while a tap's last Redis command failed (it tries again every redis.retry_interval_s)."))
    b.row("Publishing")
    b.add(series("Events published/s by type", "ops",
                 [prom("sum by (type) (rate(gateway_tap_publisher_events_published_total[$__rate_interval]))",
                       "{{type}}")], "Events Kafka acknowledged."))
    b.add(series("Publish queue depth", "short",
                 [prom("sum by (instance) (gateway_tap_publisher_queue_depth_events)", "{{instance}}")],
                 "Events waiting in each tap's in-memory queue."))
    b.add(series("Spool depth (events)", "short",
                 [prom("sum by (instance) (gateway_tap_publisher_spool_pending_events)", "{{instance}}")],
                 "Events on disk waiting for Kafka: above zero while Kafka is down or slow."))
    b.add(series("Spool size", "bytes",
                 [prom("sum by (instance) (gateway_tap_publisher_spool_bytes)", "{{instance}}")]))
    b.add(stat.Panel().title("Taps connected to Kafka").datasource(PROMETHEUS).unit("short")
          .with_target(prom("sum(gateway_tap_publisher_kafka_connected)", instant=True)), width=6)
    b.add(stat.Panel().title("Taps up").datasource(PROMETHEUS).unit("short")
          .with_target(prom('sum(up{job="tap"})', instant=True)), width=6)
    b.add(series("Events spooled or dropped/s", "ops",
                 [prom("sum by (type) (rate(gateway_tap_publisher_events_spooled_total[$__rate_interval]))",
                       "spooled {{type}}"),
                  prom("sum by (type, reason) (rate(gateway_tap_publisher_events_dropped_total[$__rate_interval]))",
                       "dropped {{type}} ({{reason}})", ref="B")]), width=12)
    return b


# ------------------------------------------------------------------------------------- Pipeline

def pipeline() -> Board:
    sel = '{collector=~"$collector"}'
    b = Board("gateway-tap-pipeline", "gateway-tap / Pipeline",
              "Collector workers: throughput, consumer lag, batches, retries, dead letters and freshness.",
              [variable("collector", "Collector", "gateway_tap_collector_events_consumed_total")])
    b.row("Throughput and lag")
    b.add(series("Events handled/s by collector and type", "ops",
                 [prom(f"sum by (collector, type) (rate(gateway_tap_collector_events_handled_total{sel}"
                       "[$__rate_interval]))", "{{collector}} {{type}}")],
                 "Events a sink confirmed (offsets are committed after this)."))
    b.add(series("Events consumed/s by collector and type", "ops",
                 [prom(f"sum by (collector, type) (rate(gateway_tap_collector_events_consumed_total{sel}"
                       "[$__rate_interval]))", "{{collector}} {{type}}")]))
    b.add(series("Consumer lag by collector and topic", "short",
                 [prom(f"sum by (collector, topic) (gateway_tap_collector_consumer_lag{sel})",
                       "{{collector}} {{topic}}")],
                 "High-water mark minus the next offset to handle, summed over partitions."))
    b.add(series("Freshness p99 by collector and type", "s",
                 [prom("histogram_quantile(0.99, sum by (le, collector, type) "
                       f"(rate(gateway_tap_collector_freshness_seconds_bucket{sel}[$__rate_interval])))",
                       "{{collector}} {{type}}")],
                 "Handling time minus the event's emitted_at: how old data is when it reaches the sink."))
    b.row("Batches")
    b.add(series("Batch duration by collector", "s",
                 quantile_queries("gateway_tap_collector_batch_duration_seconds", sel, ["collector"]),
                 "From a batch's hand-over to the sink until its offsets are committed."))
    b.add(series("Batch size p50 by collector", "short",
                 [prom("histogram_quantile(0.5, sum by (le, collector) "
                       f"(rate(gateway_tap_collector_batch_size_bucket{sel}[$__rate_interval])))", "{{collector}}")]))
    b.add(series("Event-loop lag p99 by collector", "s",
                 [prom("histogram_quantile(0.99, sum by (le, collector) "
                       f"(rate(gateway_tap_event_loop_lag_seconds_bucket{sel}[$__rate_interval])))",
                       "{{collector}}")],
                 "How late the collector's loop ran a timer that was due: a sink that blocks the loop shows here."))
    b.add(series("Retries/s by collector", "ops",
                 [prom(f"sum by (collector) (rate(gateway_tap_collector_retries_total{sel}[$__rate_interval]))",
                       "{{collector}}")], "Batches retried after a retriable failure (sink down, timeouts)."))
    b.add(series("Dead letters by collector, type and error", "short",
                 [prom(f"sum by (collector, type, error_class) (increase("
                       f"gateway_tap_collector_events_dead_lettered_total{sel}[$__rate_interval]))",
                       "{{collector}} {{type}} {{error_class}}")],
                 "Events sent to <topic>.dlq: inspect with `gateway-tap dlq list`, resend with `dlq replay`."))
    b.row("Sinks")
    b.add(series("Elasticsearch bulk items/s by outcome", "ops",
                 [prom("sum by (type, outcome) (rate(gateway_tap_es_documents_total[$__rate_interval]))",
                       "{{type}} {{outcome}}")]))
    b.add(series("Elasticsearch bulk request duration", "s", quantile_queries("gateway_tap_es_bulk_seconds")))
    b.add(series("Budget store: usage recorded/s by outcome", "ops",
                 [prom("sum by (outcome) (rate(gateway_tap_budget_recorded_total[$__rate_interval]))",
                       "{{outcome}}")], "inserted, or duplicate (a redelivered event: recorded once)."))
    b.add(series("Budget store transaction duration", "s", quantile_queries("gateway_tap_budget_batch_seconds")))
    return b


# ------------------------------------------------------------------------------ Usage and spend

def usage() -> Board:
    sel = '{app=~"$app", llm=~"$llm"}'
    b = Board("gateway-tap-usage", "gateway-tap / Usage and spend",
              "Tokens and cost by app and model, counted by the tap; top apps from the analytics events.",
              [variable("app", "App", "gateway_tap_tokens_total"), variable("llm", "LLM", "gateway_tap_tokens_total")])
    b.row("Tokens")
    b.add(series("Tokens/s by app and model", "short",
                 [prom(f"sum by (app, model) (rate(gateway_tap_tokens_total{sel}[$__rate_interval]))",
                       "{{app}} {{model}}")], stack=True))
    b.add(series("Tokens/s by kind", "short",
                 [prom(f"sum by (kind) (rate(gateway_tap_tokens_total{sel}[$__rate_interval]))", "{{kind}}")],
                 "input (prompt) and output (completion) tokens."))
    b.row("Spend")
    b.add(series("Spend (USD/hour) by app and model", "currencyUSD",
                 [prom(f"sum by (app, model) (rate(gateway_tap_cost_usd_total{sel}[$__rate_interval])) * 3600",
                       "{{app}} {{model}}")], "From the configured prices; models without a price show as other.",
                 stack=True))
    b.add(bargauge.Panel().title("Spend in the time range by app").datasource(PROMETHEUS).unit("currencyUSD")
          .with_target(prom(f"sort_desc(sum by (app) (increase(gateway_tap_cost_usd_total{sel}[$__range])))",
                            "{{app}}", instant=True)))
    b.add(bargauge.Panel().title("Tokens in the time range by model").datasource(PROMETHEUS).unit("short")
          .with_target(prom(f"sort_desc(sum by (model) (increase(gateway_tap_tokens_total{sel}[$__range])))",
                            "{{model}}", instant=True)))
    b.add(table.Panel().title("Top apps by spend (analytics events, Elasticsearch)").datasource(ELASTICSEARCH)
          .description("Sum of cost per app_id over gateway-analytics-* in the time range (the elasticsearch "
                       "collector's indices): independent of Prometheus retention.")
          .with_target(elasticsearch.Dataquery().ref_id("A").datasource(ELASTICSEARCH).query("*")
                       .time_field("emitted_at").alias("spend")
                       .metrics([elasticsearch.Sum().id("1").field("cost")])
                       .bucket_aggs([elasticsearch.Terms().id("2").field("app_id").settings(
                           elasticsearch.ElasticsearchTermsSettings().order(TermsOrder.DESC).order_by("1").size("10")
                           .min_doc_count("1"))])))
    return b


# -------------------------------------------------------------------------------------- Budgets

def budgets() -> Board:
    sel = '{app=~"$app"}'
    ratio = f"max by (app, llm, period) (gateway_tap_budget_used_ratio{sel})"
    b = Board("gateway-tap-budgets", "gateway-tap / Budgets",
              "Spend against each budget's limit in its current period, as the taps enforce it.",
              [variable("app", "App", "gateway_tap_budget_used_ratio")])
    b.row("Budgets")
    b.add(bargauge.Panel().title("Spend vs limit per app (current period)").datasource(PROMETHEUS)
          .unit("percentunit").min(0).max(1).thresholds(percent_thresholds())
          .description("Spend / limit (the larger of USD and tokens). Hard budgets block with 429 at 100%.")
          .with_target(prom(ratio, "{{app}} {{llm}} {{period}}", instant=True)))
    b.add(table.Panel().title("Apps over 80% of their budget").datasource(PROMETHEUS).unit("percentunit")
          .thresholds(percent_thresholds())
          .with_target(prom(f"{ratio} > 0.8", "{{app}} {{llm}} {{period}}", instant=True)))
    b.add(series("Budget use over time", "percentunit", [prom(ratio, "{{app}} {{llm}} {{period}}")]),
          width=24)
    b.row("Enforcement")
    b.add(series("Admission decisions/s by result", "ops",
                 [prom("sum by (result) (rate(gateway_tap_budget_decisions_total[$__rate_interval]))", "{{result}}")],
                 "allowed, blocked (over a hard budget) and the store-error policies."))
    b.add(series("Spend (USD/hour) by app", "currencyUSD",
                 [prom(f"sum by (app) (rate(gateway_tap_cost_usd_total{sel}[$__rate_interval])) * 3600",
                       "{{app}}")]))
    b.add(series("Budget cache age", "s",
                 [prom("time() - max by (instance) (gateway_tap_budget_last_refresh_timestamp_seconds)",
                       "{{instance}}")], "Seconds since each tap last read the budget store."))
    b.add(series("Threshold alerts raised", "short",
                 [prom(f"sum by (app, threshold) (increase(gateway_tap_budget_alerts_total{sel}[$__rate_interval]))",
                       "{{app}} {{threshold}}")],
                 "Raised once per budget, threshold and period by the budget collector."))
    return b


DASHBOARDS: dict[str, Callable[[], Board]] = {"tap": tap, "pipeline": pipeline, "usage": usage, "budgets": budgets}


def prometheus_queries(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every Prometheus target of a dashboard JSON document, in panel order."""
    queries = []
    for panel in document.get("panels", []):
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel.get("datasource") or {}).get("uid") == PROMETHEUS.uid:
                queries.append((panel["title"], target["expr"]))
    return queries


def concrete(expr: str, *, interval: str = "5m", variables: dict[str, str] | None = None) -> str:
    """``expr`` as Prometheus evaluates it: Grafana's ranges become ``interval``, each ``$var`` its value
    (default ``.*``, the variables' "All")."""
    for name in ("$__rate_interval", "$__interval", "$__range"):
        expr = expr.replace(name, interval)
    return re.sub(r"\$(\w+)", lambda m: (variables or {}).get(m.group(1), ".*"), expr)


def render(name: str) -> str:
    """The JSON document of one dashboard, as committed (sorted keys, stable ids, trailing newline)."""
    return json.dumps(DASHBOARDS[name]().dashboard.build(), cls=JSONEncoder, sort_keys=True, indent=2) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed JSON is not current")
    parser.add_argument("--out", type=Path, default=JSON_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name in DASHBOARDS:
        path = args.out / f"{name}.json"
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("stale (run python -m dashboards.generate):", *stale, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
