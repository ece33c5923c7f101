"""Sample events of every type, valid against the published schemas."""

from __future__ import annotations

from datetime import date

import schemas
from schemas import (
    Analytics,
    BudgetUsage,
    ErrorInfo,
    Latency,
    ProxyLog,
)


def sample_events() -> list[schemas.Event]:
    common = {"gateway_id": "tap-1", "request_id": "req-1", "app_id": "app-a", "llm_id": "openai-main"}
    return [
        ProxyLog(**common, method="POST", path="/llm/openai-main/v1/chat/completions", vendor="openai",
                 status_code=200, request_bytes=120, response_bytes=800, streamed=True,
                 latency=Latency(total_ms=12.5, upstream_ms=11.0, ttfb_ms=3.2, tap_overhead_ms=0.4),
                 request_headers={"authorization": "[REDACTED]"}, metadata={"team": "search"}),
        ProxyLog(gateway_id="tap-1", request_id="req-2", method="POST", path="/llm/x/v1/chat/completions",
                 status_code=401, latency=Latency(total_ms=0.2),
                 error=ErrorInfo(type="invalid_request_error", code="invalid_api_key", message="unknown key")),
        Analytics(**common, vendor="openai", model="gpt-4o-mini", prompt_tokens=10, completion_tokens=16,
                  total_tokens=26, cost=0.0000111, latency_ms=12.5, ttft_ms=3.2, status_code=200,
                  choices=1, tags={"team": "search"}),
        BudgetUsage(**common, model="gpt-4o-mini", prompt_tokens=10, completion_tokens=16, total_tokens=26,
                    cost=0.0000111, period="monthly", period_start=date(2026, 11, 1)),
    ]
