"""The analytics cookbook over the lake's Parquet, in DuckDB and ClickHouse SQL (docs/analytics.md shows them verbatim).

Each query reads the tables or views ``gateway-tap lake ddl`` defines (``gateway_analytics``,
``gateway_proxy_log``) and covers the current UTC month through the ``dt`` partition column, so only that
month's directories are read. The test suite runs every one in both engines (DuckDB; chdb, ClickHouse
in-process, against the test S3) over a data set written by the collector, and checks the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LakeQuery:
    """One cookbook question in both dialects."""

    name: str
    title: str
    duckdb: str
    clickhouse: str
    note: str


QUERIES: tuple[LakeQuery, ...] = (
    LakeQuery(
        "spend_per_app_per_day", "Spend and tokens per app per day",
        duckdb="""SELECT app_id, dt AS day, sum(cost) AS spend, sum(prompt_tokens) AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens, count(*) AS calls
FROM gateway_analytics
WHERE dt >= date_trunc('month', current_date)
GROUP BY app_id, dt
ORDER BY day, app_id""",
        clickhouse="""SELECT app_id, dt AS day, sum(cost) AS spend, sum(prompt_tokens) AS prompt_tokens,
       sum(completion_tokens) AS completion_tokens, sum(total_tokens) AS total_tokens, count() AS calls
FROM gateway_analytics
WHERE dt >= toStartOfMonth(today())
GROUP BY app_id, dt
ORDER BY day, app_id""",
        note="`dt` is the UTC day of `emitted_at` (the layout's directory), so the filter reads only this "
             "month's directories. `cost` is summed as stored; add `currency` to the grouping if your LLMs bill "
             "in several."),
    LakeQuery(
        "latency_per_model", "p50 / p95 latency and time to first token per model",
        duckdb="""SELECT model, count(*) AS calls,
       quantile_cont(latency_ms, 0.5) AS p50_ms, quantile_cont(latency_ms, 0.95) AS p95_ms,
       quantile_cont(ttft_ms, 0.95) AS p95_ttft_ms
FROM gateway_analytics
WHERE dt >= date_trunc('month', current_date)
GROUP BY model
ORDER BY model""",
        clickhouse="""SELECT model, count() AS calls,
       quantileExactInclusive(0.5)(latency_ms) AS p50_ms, quantileExactInclusive(0.95)(latency_ms) AS p95_ms,
       quantileExactInclusive(0.95)(ttft_ms) AS p95_ttft_ms
FROM gateway_analytics
WHERE dt >= toStartOfMonth(today())
GROUP BY model
ORDER BY model""",
        note="Exact percentiles with linear interpolation in both engines (the same numbers). `ttft_ms` is "
             "only set on streamed calls: its percentile is over those (NULLs are skipped)."),
    LakeQuery(
        "tokens_per_user", "Tokens per user",
        duckdb="""SELECT user_id, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(total_tokens) AS total_tokens, count(*) AS calls
FROM gateway_analytics
WHERE dt >= date_trunc('month', current_date) AND user_id IS NOT NULL
GROUP BY user_id
ORDER BY total_tokens DESC, user_id""",
        clickhouse="""SELECT user_id, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(total_tokens) AS total_tokens, count() AS calls
FROM gateway_analytics
WHERE dt >= toStartOfMonth(today()) AND user_id IS NOT NULL
GROUP BY user_id
ORDER BY total_tokens DESC, user_id""",
        note="`user_id` is set when a hook or the credential identifies the end user; calls without one are "
             "left out."),
    LakeQuery(
        "errors_by_type", "Errors by type",
        duckdb="""SELECT error.type AS error_type, status_code, count(*) AS requests
FROM gateway_proxy_log
WHERE dt >= date_trunc('month', current_date) AND error.type IS NOT NULL
GROUP BY error_type, status_code
ORDER BY requests DESC, error_type, status_code""",
        clickhouse="""SELECT error.type AS error_type, status_code, count() AS requests
FROM gateway_proxy_log
WHERE dt >= toStartOfMonth(today()) AND error.type IS NOT NULL
GROUP BY error_type, status_code
ORDER BY requests DESC, error_type, status_code""",
        note="Proxy logs carry every request, those the tap rejected included; `error` is a struct "
             "(`type`, `code`, `message`), set when the tap refused the request or the upstream failed."),
)


def markdown() -> str:
    """The cookbook as docs/analytics.md shows it."""
    out = []
    for q in QUERIES:
        out.append(f"### {q.title}\n\n`{q.name}`\n\nDuckDB:\n\n```sql\n{q.duckdb};\n```\n\n"
                   f"ClickHouse:\n\n```sql\n{q.clickhouse};\n```\n\n{q.note}\n")
    return "\n".join(out)
