"""The otlp collectors against a receiver that decodes the real OTLP/HTTP protobuf (tests/support/otlp.py: no
OpenTelemetry Collector can be installed here, so the test double decodes with the same generated classes a
Collector uses). Attribute names and values are asserted exactly against the semantic conventions v1.41.
test_against_a_real_collector runs only when OTEL_EXPORTER_OTLP_ENDPOINT points at a real one."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from collectors.delivery import retriable
from collectors.registry import resolve_collector
from collectors.sdk import ConfigError, RetryLater
from collectors.sinks.otlp import (
    DURATION_BUCKETS_S,
    SCHEMA_URL,
    TOKEN_BUCKETS,
    OtlpCollector,
    OtlpContentCollector,
    Rejected,
)
from collectors.testing import CollectorHarness
from gateway_tap.dev.servers import free_port
from schemas import Analytics, Latency, ProxyLog, topic_for
from tests.support.collectors import collect_process, create_topics, read_topic, wait_for
from tests.support.otlp import attributes, otlp_receiver
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, running_tap, tap_config

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
WHEN = datetime(2026, 12, 10, 12, 0, 0, 250_000, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def call(**fields: Any) -> Analytics:
    base: dict[str, Any] = dict(
        gateway_id="tap-1", request_id="req_1", app_id="team-a", llm_id="anthropic", user_id="u-7",
        trace_id=TRACE, span_id="00f067aa0ba902b7", parent_span_id="53995c3f42cd8ad8", emitted_at=WHEN,
        vendor="anthropic", model="claude-3-5-haiku-20241022", prompt_tokens=3000, completion_tokens=900,
        total_tokens=3900, cache_read_tokens=1000, cache_write_tokens=1500, reasoning_tokens=700, cost=0.00638,
        cost_micros=6380, cost_input_micros=400, cost_cache_read_micros=80, cost_cache_write_micros=1500,
        cost_output_micros=800, cost_reasoning_micros=3600, price_version="genai-prices-0.2.3+0123456789ab",
        price_source="catalog:anthropic/claude-3-5-haiku-latest", latency_ms=812.5, ttft_ms=120.0, status_code=200,
        streamed=True, operation="chat", request_model="claude-3-5-haiku-latest",
        response_model="claude-3-5-haiku-20241022", response_id="msg_01", finish_reasons=["end_turn"],
        request_max_tokens=1024, request_temperature=0.2, request_top_p=0.9, request_stream=True,
        server_address="api.anthropic.com", server_port=443)
    base.update(fields)
    return Analytics(**base)


async def test_one_span_per_event_with_the_conventions_exact_attributes_and_the_two_histograms() -> None:
    ok = call()
    failed = call(request_id="req_2", span_id="1111111111111111", parent_span_id=None, status_code=500,
                  prompt_tokens=0, completion_tokens=0, total_tokens=0, cache_read_tokens=None,
                  cache_write_tokens=None, reasoning_tokens=None, cost=0.0, cost_micros=None, cost_input_micros=None,
                  cost_cache_read_micros=None, cost_cache_write_micros=None, cost_output_micros=None,
                  cost_reasoning_micros=None, price_version=None, price_source=None, latency_ms=30.0, streamed=False,
                  request_stream=None, ttft_ms=None, response_id=None, finish_reasons=None, response_model=None,
                  user_id=None)
    estimated = call(request_id="req_3", span_id="2222222222222222", tokens_estimated=True, usage_invalid=True,
                     latency_ms=5000.0)
    async with otlp_receiver() as rx, CollectorHarness(OtlpCollector, {"endpoint": rx.url}) as h:
        await h.feed([ok, failed, estimated])
        await h.flush()
    assert h.flushed and not h.rejected
    assert [len(rx.received[s]) for s in ("traces", "metrics", "logs")] == [1, 1, 0]
    assert rx.headers[0]["Content-Encoding"] == "gzip" and rx.headers[0]["Content-Type"] == "application/x-protobuf"
    resource_spans = rx.received["traces"][0].resource_spans[0]
    assert resource_spans.schema_url == SCHEMA_URL == "https://opentelemetry.io/schemas/1.41.0"
    resource = attributes(resource_spans.resource)
    assert resource["service.name"] == "gateway-tap" and resource["service.instance.id"]
    assert resource_spans.scope_spans[0].scope.name == "gateway-tap"
    spans = rx.spans()
    assert len(spans) == 3
    span = spans[0]
    # The event's W3C ids: the span joins the caller's trace as a child of the caller's span.
    assert (span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex()) == (
        TRACE, "00f067aa0ba902b7", "53995c3f42cd8ad8")
    assert span.name == "chat claude-3-5-haiku-latest" and span.kind == span.SPAN_KIND_CLIENT
    end = int(WHEN.timestamp()) * 10**9 + 250_000_000
    assert (span.end_time_unix_nano, span.start_time_unix_nano) == (end, end - 812_500_000)
    assert span.status.code == 0  # unset: a success
    assert attributes(span) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.request.model": "claude-3-5-haiku-latest",
        "gen_ai.response.model": "claude-3-5-haiku-20241022",
        "gen_ai.request.max_tokens": 1024,
        "gen_ai.request.temperature": 0.2,
        "gen_ai.request.top_p": 0.9,
        "gen_ai.request.stream": True,
        "gen_ai.response.id": "msg_01",
        "gen_ai.response.finish_reasons": ["end_turn"],
        "gen_ai.response.time_to_first_chunk": 0.12,
        "gen_ai.usage.input_tokens": 3000,
        "gen_ai.usage.output_tokens": 900,
        "gen_ai.usage.cache_read.input_tokens": 1000,
        "gen_ai.usage.cache_creation.input_tokens": 1500,
        "gen_ai.usage.reasoning.output_tokens": 700,
        "server.address": "api.anthropic.com",
        "server.port": 443,
        "http.response.status_code": 200,
        "user.id": "u-7",
        "gateway_tap.request.id": "req_1",
        "gateway_tap.gateway.id": "tap-1",
        "gateway_tap.app.id": "team-a",
        "gateway_tap.llm.id": "anthropic",
        "gateway_tap.cost.amount": 0.00638,
        "gateway_tap.cost.currency": "USD",
        "gateway_tap.cost.total_micros": 6380,
        "gateway_tap.cost.input_micros": 400,
        "gateway_tap.cost.cache_read_micros": 80,
        "gateway_tap.cost.cache_write_micros": 1500,
        "gateway_tap.cost.output_micros": 800,
        "gateway_tap.cost.reasoning_micros": 3600,
        "gateway_tap.cost.price_version": "genai-prices-0.2.3+0123456789ab",
        "gateway_tap.cost.price_source": "catalog:anthropic/claude-3-5-haiku-latest",
    }
    error = spans[1]
    assert error.parent_span_id == b"" and error.status.code == error.status.STATUS_CODE_ERROR
    got = attributes(error)
    assert got["error.type"] == "500" and "gen_ai.usage.input_tokens" not in got
    assert "gateway_tap.cost.amount" not in got
    assert attributes(spans[2])["gateway_tap.usage.estimated"] is True
    assert attributes(spans[2])["gateway_tap.usage.invalid"] is True and "gateway_tap.usage.invalid" not in got

    metrics = {m.name: m for m in rx.metrics()}
    assert set(metrics) == {"gen_ai.client.operation.duration", "gen_ai.client.token.usage"}
    duration, tokens = metrics["gen_ai.client.operation.duration"], metrics["gen_ai.client.token.usage"]
    assert (duration.unit, tokens.unit) == ("s", "{token}")
    assert duration.histogram.aggregation_temporality == tokens.histogram.aggregation_temporality == 1  # DELTA
    points = {tuple(sorted(attributes(p).items())): p for p in duration.histogram.data_points}
    assert len(points) == 2  # the successes share an attribute set, the failure has error.type
    ok_point = next(p for k, p in points.items() if ("error.type", "500") not in k)
    assert list(ok_point.explicit_bounds) == list(DURATION_BUCKETS_S)
    assert (ok_point.count, ok_point.sum, ok_point.min, ok_point.max) == (2, 5.8125, 0.8125, 5.0)
    assert ok_point.bucket_counts[list(DURATION_BUCKETS_S).index(1.28)] == 1  # 0.8125 s
    assert attributes(ok_point) == {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "anthropic",
                                    "gen_ai.request.model": "claude-3-5-haiku-latest",
                                    "gen_ai.response.model": "claude-3-5-haiku-20241022",
                                    "server.address": "api.anthropic.com", "server.port": 443}
    # Token usage: only the reported usage (not the estimate, not the failure), by gen_ai.token.type.
    by_type = {attributes(p)["gen_ai.token.type"]: p for p in tokens.histogram.data_points}
    assert {t: (p.count, p.sum) for t, p in by_type.items()} == {"input": (1, 3000), "output": (1, 900)}
    assert list(by_type["input"].explicit_bounds) == list(TOKEN_BUCKETS)
    assert by_type["input"].start_time_unix_nano < by_type["input"].time_unix_nano


async def test_a_retry_resends_only_what_the_receiver_did_not_accept() -> None:
    events = [call(), call(request_id="req_2", span_id="3333333333333333")]
    async with otlp_receiver() as rx, CollectorHarness(OtlpCollector, {"endpoint": rx.url,
                                                                      "compression": "none"}) as h:
        rx.answers["traces"] = [503]
        with pytest.raises(RetryLater) as first:
            await h.feed(events)
        assert retriable(first.value) and "503" in str(first.value) and first.value.retry_after == 1.0  # Retry-After
        rx.answers["metrics"] = [429]
        with pytest.raises(RetryLater):  # the spans went through this time, the metrics did not
            await h.feed(events)
        await h.feed(events)  # the runtime's retry of the same batch: only the metrics are sent again
        await h.flush()
    assert len(rx.received["traces"]) == 1 and len(rx.spans()) == 2
    assert len(rx.received["metrics"]) == 1
    assert "Content-Encoding" not in rx.headers[-1]


async def test_a_4xx_is_final_and_dead_letters_the_batch() -> None:
    async with otlp_receiver() as rx, CollectorHarness(OtlpCollector, {"endpoint": rx.url}) as h:
        rx.answers["traces"] = [400]
        with pytest.raises(Rejected) as refused:
            await h.feed([call()])
    assert not retriable(refused.value) and "400" in str(refused.value) and "scripted failure" in str(refused.value)


async def test_an_unreachable_receiver_is_retried() -> None:
    async with CollectorHarness(OtlpCollector, {"endpoint": f"http://127.0.0.1:{free_port()}",
                                                "timeout_s": 2}) as h:
        with pytest.raises(RetryLater, match="unreachable"):
            await h.feed([call()])


async def test_content_only_when_explicitly_enabled() -> None:
    assert resolve_collector("otlp") is OtlpCollector and resolve_collector("otlp_content") is OtlpContentCollector
    assert OtlpCollector.consumed_types() == ("analytics",) and OtlpContentCollector.consumed_types() == ("proxy_log",)
    with pytest.raises(ConfigError, match="capture_content: true"):
        async with CollectorHarness(OtlpContentCollector, {}):
            pass
    with pytest.raises(ConfigError, match="exports no content"):
        async with CollectorHarness(OtlpCollector, {"capture_content": True}):
            pass
    request = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"}]}
    answer = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": "Hello!"}}]}
    log = ProxyLog(gateway_id="tap-1", request_id="req_1", trace_id=TRACE, span_id="00f067aa0ba902b7",
                   emitted_at=WHEN, method="POST", path="/llm/openai/v1/chat/completions", vendor="openai",
                   status_code=200, latency=Latency(total_ms=10), request_body=orjson.dumps(request).decode(),
                   response_body=orjson.dumps(answer).decode())
    clipped = log.model_copy(update={"request_id": "req_2", "request_body": '{"messages": [{"role": "us...[truncated]',
                                     "response_body": "data: {\"choices\": []}\n\n"})
    bare = log.model_copy(update={"request_id": "req_3", "request_body": None, "response_body": None})
    async with otlp_receiver() as rx, CollectorHarness(OtlpContentCollector, {"endpoint": rx.url,
                                                                             "capture_content": True}) as h:
        await h.feed([log, clipped, bare])
    records = rx.log_records()
    assert len(records) == 2  # nothing captured, nothing sent
    record = records[0]
    assert (record.event_name, record.trace_id.hex(), record.span_id.hex()) == (
        "gen_ai.client.inference.operation.details", TRACE, "00f067aa0ba902b7")
    got = attributes(record)
    assert orjson.loads(got["gen_ai.input.messages"]) == [
        {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Hi"}]}]
    assert orjson.loads(got["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello!"}], "finish_reason": "stop"}]
    raw = attributes(records[1])  # clipped or streamed bodies are exported as captured
    assert raw["gateway_tap.request.body"].endswith("[truncated]") and "gen_ai.input.messages" not in raw
    assert raw["gateway_tap.response.body"].startswith("data: ")


async def test_through_the_tap_and_the_runtime_joins_the_callers_trace_and_dead_letters_4xx(
        mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """SDK -> tap (continuing the caller's traceparent) -> Kafka -> ``gateway-tap collect otlp`` -> receiver;
    then the receiver refuses a batch with 400 and the runtime puts it on the dead-letter topic."""
    await create_topics(kafka_bootstrap, topic_prefix)
    caller_span = "b7ad6b7169203331"
    async with otlp_receiver() as rx:
        doc = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool")
        doc["collectors"] = {"otlp": {"group_id": f"{topic_prefix}-otlp", "group_instance_id": f"{topic_prefix}-o1",
                                      "session_timeout_ms": 10_000, "batch": {"max_events": 50, "max_wait_ms": 20},
                                      "retry": {"initial_backoff_ms": 50, "max_backoff_ms": 200},
                                      "metrics": {"port": free_port()}, "config": {"endpoint": rx.url}}}
        collector = collect_process("otlp", "otlp", doc, tmp_path)
        await asyncio.to_thread(collector.start)
        try:
            async with running_tap(doc) as tap:
                client = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
                raw = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there!"}],  # type: ignore[list-item]
                    max_tokens=5, temperature=0.5,
                    extra_headers={"traceparent": f"00-{TRACE}-{caller_span}-01", "x-mock-cache-read-tokens": "2"})
                tap_span = raw.headers["traceparent"].split("-")[2]
                await wait_for(lambda: any(s.trace_id.hex() == TRACE for s in rx.spans()), "the span arrives")
                span = next(s for s in rx.spans() if s.trace_id.hex() == TRACE)
                assert (span.span_id.hex(), span.parent_span_id.hex()) == (tap_span, caller_span)
                got = attributes(span)
                assert {k: got[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                                            "gen_ai.response.model", "gen_ai.request.max_tokens",
                                            "gen_ai.request.temperature", "gen_ai.usage.input_tokens",
                                            "gen_ai.usage.output_tokens", "gen_ai.usage.cache_read.input_tokens",
                                            "gen_ai.response.finish_reasons", "server.address",
                                            "gateway_tap.cost.price_source")} == {
                    "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o-mini", "gen_ai.response.model": "gpt-4o-mini",
                    "gen_ai.request.max_tokens": 5, "gen_ai.request.temperature": 0.5,
                    "gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 5,
                    "gen_ai.usage.cache_read.input_tokens": 2, "gen_ai.response.finish_reasons": ["stop"],
                    "server.address": "127.0.0.1", "gateway_tap.cost.price_source": "config:gpt-4o-mini"}
                await wait_for(lambda: rx.metrics(), "the histograms arrive")

                rx.answers["traces"] = [400]
                refused = await client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "Refuse me"}])  # type: ignore[list-item]
                refused_id = refused.headers["x-request-id"]
                dead = await read_topic(kafka_bootstrap, topic_for("analytics", topic_prefix) + ".dlq", 1)
                value = orjson.loads(dead[0].value)
                headers = {k: v.decode() for k, v in dead[0].headers}
                assert value["request_id"] == refused_id
                assert headers["error_class"] == "Rejected" and "400" in headers["error"]
        finally:
            await asyncio.to_thread(collector.stop)


@pytest.mark.skipif(not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
                    reason="needs a real OpenTelemetry Collector: set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. "
                           "http://127.0.0.1:4318 with `docker-compose --profile otel up -d otel-collector`)")
async def test_against_a_real_collector() -> None:
    """A real Collector accepts the spans and histograms (no partial success) with its default endpoint."""
    async with CollectorHarness(OtlpCollector, {}) as h:
        await h.feed([call(), call(request_id="req_2", span_id="4444444444444444", status_code=429)])
        await h.flush()
        collector = h.collector
        assert isinstance(collector, OtlpCollector)
        registry = h.registry
    assert registry.get_sample_value("gateway_tap_otlp_exported_total", {"signal": "traces"}) == 2
    assert registry.get_sample_value("gateway_tap_otlp_rejected_total", {"signal": "traces"}) is None
