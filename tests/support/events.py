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
        # Revision 1.2: token classes, the cost split the same way and its price version, the GenAI fields.
        Analytics(**{**common, "request_id": "req-3"}, vendor="anthropic", model="claude-3-5-haiku-20241022",
                  prompt_tokens=3000, completion_tokens=900, total_tokens=3900, cache_read_tokens=1000,
                  cache_write_tokens=1500, reasoning_tokens=700, cost=0.00638, cost_micros=6380,
                  cost_input_micros=400, cost_cache_read_micros=80, cost_cache_write_micros=1500,
                  cost_output_micros=800, cost_reasoning_micros=3600,
                  price_version="genai-prices-0.2.3+0123456789ab",
                  price_source="catalog:anthropic/claude-3-5-haiku-latest", latency_ms=812.0, status_code=200,
                  streamed=True, operation="chat", request_model="claude-3-5-haiku-latest",
                  response_model="claude-3-5-haiku-20241022", response_id="msg_01", finish_reasons=["end_turn"],
                  request_max_tokens=1024, request_temperature=0.2, request_top_p=0.9, request_stream=True,
                  server_address="api.anthropic.com", server_port=443),
        BudgetUsage(**{**common, "request_id": "req-3"}, model="claude-3-5-haiku-20241022", prompt_tokens=3000,
                    completion_tokens=900, total_tokens=3900, cache_read_tokens=1000, cache_write_tokens=1500,
                    reasoning_tokens=700, cost=0.00638, cost_micros=6380, cost_input_micros=400,
                    cost_cache_read_micros=80, cost_cache_write_micros=1500, cost_output_micros=800,
                    cost_reasoning_micros=3600, price_version="genai-prices-0.2.3+0123456789ab",
                    price_source="catalog:anthropic/claude-3-5-haiku-latest", period="daily",
                    period_start=date(2026, 11, 24)),
        # Revision 1.4: the key that authenticated, by its id (an issued key's; a file key's hash prefix).
        Analytics(**{**common, "request_id": "req-4"}, key_id="key_3f2a9c01d4e5b6a7", vendor="openai",
                  model="gpt-4o-mini", prompt_tokens=10, completion_tokens=16, total_tokens=26, cost=0.0000111,
                  cost_micros=11, latency_ms=9.0, status_code=200),
        BudgetUsage(**{**common, "request_id": "req-4"}, key_id="sha256:9f86d081884c", model="gpt-4o-mini",
                    prompt_tokens=10, completion_tokens=16, total_tokens=26, cost=0.0000111, cost_micros=11,
                    period="monthly", period_start=date(2026, 11, 1)),
    ]
