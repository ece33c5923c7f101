"""The analytics cookbook: the ``_search`` bodies ``docs/analytics.md`` publishes.

This module is the one home of those queries: the doc shows them verbatim (a test
checks it) and the test suite runs them against a real server over a known data set.
The small ``*_rows`` helpers turn a response into plain rows, doing the arithmetic
(ratios, ordering) that not every server does for you.

Every query covers the current calendar month (``now/M``, UTC); change that range for
other windows.

Run ``python -m collectors.sinks.es_queries`` to print the cookbook section of the doc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from collectors.sinks.es_templates import alias_name
from schemas.events import EventType

THIS_MONTH: dict[str, Any] = {"range": {"emitted_at": {"gte": "now/M"}}}
COST_FIELDS = ("cost_micros", "cost_input_micros", "cost_cache_read_micros", "cost_cache_write_micros",
               "cost_output_micros", "cost_reasoning_micros")
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens")


@dataclass(frozen=True)
class CookbookQuery:
    """One published query: a ``_search`` body against the read alias of ``event_type``."""

    name: str
    title: str
    event_type: EventType
    body: dict[str, Any]
    note: str = ""

    def index(self, prefix: str = "gateway") -> str:
        return alias_name(prefix, self.event_type)

    def pretty(self) -> str:
        return orjson.dumps(self.body, option=orjson.OPT_INDENT_2).decode()

    def curl(self, prefix: str = "gateway") -> str:
        """A ready-to-run shell line (``$ES`` is the cluster URL; add ``-u``/``-H Authorization`` as needed)."""
        compact = orjson.dumps(self.body).decode()
        return (f"curl -s \"$ES/{self.index(prefix)}/_search?pretty\" -H 'Content-Type: application/json' "
                f"-d '{compact}'")


def _sums(*fields: str) -> dict[str, Any]:
    return {field: {"sum": {"field": field}} for field in fields}


COST_TOKENS_PER_APP_PER_DAY = CookbookQuery(
    name="cost_tokens_per_app_per_day",
    title="Cost and tokens per app per day",
    event_type="analytics",
    body={
        "size": 0,
        "query": THIS_MONTH,
        "aggs": {
            "apps": {
                "terms": {"field": "app_id", "size": 1000},
                "aggs": {
                    "days": {
                        "date_histogram": {"field": "emitted_at", "calendar_interval": "day", "min_doc_count": 1},
                        "aggs": _sums(*COST_FIELDS, *TOKEN_FIELDS),
                    }
                },
            }
        },
    },
    note="One bucket per app, one sub-bucket per UTC day that has traffic. Cost is summed in integer micro-USD "
         "(`cost_micros`, exact), split by token class (uncached input, cache read, cache write, output, reasoning: "
         "docs/pricing.md); `cost_tokens_rows` turns it into USD. Events written before contract revision 1.2 have "
         "no `cost_micros`: sum `cost` over those. If your LLMs bill in several currencies add a `terms` on "
         "`currency` level.",
)

LATENCY_PER_MODEL = CookbookQuery(
    name="latency_per_model",
    title="p50 / p95 latency and time to first token per model",
    event_type="analytics",
    body={
        "size": 0,
        "query": THIS_MONTH,
        "aggs": {
            "models": {
                "terms": {"field": "model", "size": 1000},
                "aggs": {
                    "latency_ms": {"percentiles": {"field": "latency_ms", "percents": [50, 95]}},
                    "ttft_ms": {"percentiles": {"field": "ttft_ms", "percents": [50, 95]}},
                },
            }
        },
    },
    note="`ttft_ms` is only present on streamed calls, so its percentiles are over streamed calls. "
         "Elasticsearch percentiles are approximate (TDigest); on small sets they are exact "
         "interpolations. noida-db (the local test bed) has no `percentiles` aggregation: this "
         "query is tested only against a real Elasticsearch (`GATEWAY_TAP_TEST_ES`).",
)

ERROR_RATE_PER_LLM = CookbookQuery(
    name="error_rate_per_llm",
    title="Error rate per LLM",
    event_type="analytics",
    body={
        "size": 0,
        "query": THIS_MONTH,
        "aggs": {
            "llms": {
                "terms": {"field": "llm_id", "size": 1000},
                "aggs": {
                    "errors": {"filter": {"range": {"status_code": {"gte": 400}}}},
                    "status_classes": {"terms": {"field": "status_class"}},
                },
            }
        },
    },
    note="Error rate = `errors.doc_count / doc_count` per bucket (`error_rate_rows` in "
         "`collectors/sinks/es_queries.py` does it); `status_classes` breaks the calls down into "
         "`2xx`/`4xx`/`5xx`.",
)

TOP_APPS_BY_SPEND = CookbookQuery(
    name="top_apps_by_spend",
    title="Top apps by spend this month",
    event_type="analytics",
    body={
        "size": 0,
        "query": THIS_MONTH,
        "aggs": {
            "apps": {
                "terms": {"field": "app_id", "size": 10, "order": {"spend": "desc"}},
                "aggs": {"spend": {"sum": {"field": "cost_micros"}}, "tokens": {"sum": {"field": "total_tokens"}}},
            }
        },
    },
    note="Elasticsearch orders the buckets by the `spend` sub-aggregation. noida-db silently ignores "
         "ordering by a sub-aggregation (it returns buckets by document count), so `top_apps_rows` "
         "re-sorts the buckets by spend on the client: correct on both, and the test suite checks the "
         "server's own order only against a real Elasticsearch. With more than 10 apps on noida-db, "
         "raise `size` to the number of apps before trusting the top 10.",
)

BLOCKED_BY_PLUGIN = CookbookQuery(
    name="blocked_by_plugin",
    title="Requests blocked by plugins",
    event_type="proxy_log",
    body={
        "size": 0,
        "query": {"bool": {"filter": [THIS_MONTH, {"exists": {"field": "blocked_by"}}]}},
        "aggs": {
            "plugins": {
                "terms": {"field": "blocked_by", "size": 100},
                "aggs": {"apps": {"terms": {"field": "app_id", "size": 100}}},
            }
        },
    },
    note="Proxy logs carry every request, including those a hook stopped before the upstream; "
         "`blocked_by` is the plugin's name. Requests stopped before authentication have no `app_id`: "
         "they are the bucket's `doc_count` minus the sum of its `apps` buckets (`blocked_rows` reports "
         "them as `(no app)`; the `missing` option of `terms` would do it server-side, but noida-db "
         "ignores it).",
)

COOKBOOK: tuple[CookbookQuery, ...] = (
    COST_TOKENS_PER_APP_PER_DAY,
    LATENCY_PER_MODEL,
    ERROR_RATE_PER_LLM,
    TOP_APPS_BY_SPEND,
    BLOCKED_BY_PLUGIN,
)


# --- responses -> rows ----------------------------------------------------------------------------------

def cost_tokens_rows(resp: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{app_id, day (YYYY-MM-DD), requests, cost (USD), cost_micros and its classes, tokens by class}]``."""
    rows = []
    for app in resp["aggregations"]["apps"]["buckets"]:
        for day in app["days"]["buckets"]:
            row: dict[str, Any] = {"app_id": app["key"], "day": day["key_as_string"][:10],
                                   "requests": day["doc_count"]}
            row.update({f: round(day[f]["value"] or 0) for f in (*COST_FIELDS, *TOKEN_FIELDS)})
            row["cost"] = row["cost_micros"] / 1_000_000
            rows.append(row)
    return rows


def latency_rows(resp: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{model: {latency_p50, latency_p95, ttft_p50, ttft_p95}}``."""
    out: dict[str, dict[str, float | None]] = {}
    for bucket in resp["aggregations"]["models"]["buckets"]:
        lat, ttft = bucket["latency_ms"]["values"], bucket["ttft_ms"]["values"]
        out[bucket["key"]] = {"latency_p50": lat.get("50.0"), "latency_p95": lat.get("95.0"),
                              "ttft_p50": ttft.get("50.0"), "ttft_p95": ttft.get("95.0")}
    return out


def error_rate_rows(resp: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{llm_id: {requests, errors, error_rate, status_classes: {"2xx": n, ...}}}``."""
    out = {}
    for bucket in resp["aggregations"]["llms"]["buckets"]:
        total, errors = bucket["doc_count"], bucket["errors"]["doc_count"]
        out[bucket["key"]] = {
            "requests": total,
            "errors": errors,
            "error_rate": errors / total if total else 0.0,
            "status_classes": {b["key"]: b["doc_count"] for b in bucket["status_classes"]["buckets"]},
        }
    return out


def top_apps_rows(resp: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{app_id, spend, tokens, requests}]`` by spend, highest first (sorted here, see the query's note)."""
    rows = [{"app_id": b["key"], "spend": (b["spend"]["value"] or 0) / 1_000_000, "tokens": b["tokens"]["value"],
             "requests": b["doc_count"]} for b in resp["aggregations"]["apps"]["buckets"]]
    return sorted(rows, key=lambda r: (-r["spend"], r["app_id"]))


def blocked_rows(resp: dict[str, Any]) -> dict[str, dict[str, int]]:
    """``{plugin: {app_id: blocked requests}}``; requests without an app under ``"(no app)"``."""
    out = {}
    for bucket in resp["aggregations"]["plugins"]["buckets"]:
        apps = {a["key"]: a["doc_count"] for a in bucket["apps"]["buckets"]}
        no_app = bucket["doc_count"] - sum(apps.values()) - bucket["apps"].get("sum_other_doc_count", 0)
        if no_app:
            apps["(no app)"] = no_app
        out[bucket["key"]] = apps
    return out


def render_markdown(prefix: str = "gateway") -> str:
    """The query section of ``docs/analytics.md``."""
    parts = []
    for query in COOKBOOK:
        parts.append(f"### {query.title}\n\n`{query.name}` on `{query.index(prefix)}`\n\n"
                     f"```bash\n{query.curl(prefix)}\n```\n\n```json\n{query.pretty()}\n```\n\n{query.note}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_markdown(), end="")
