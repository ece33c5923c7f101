"""Cost you can trust, end to end: the official OpenAI and Anthropic SDKs call the tap in front of the mock
upstream, which reports cache reads and writes and reasoning tokens (whole answers and streams); the tap prices
them from the genai-prices catalog; ``gateway-tap collect budget`` writes the ledger. The analytics and
budget_usage events, the ledger and ``GET /budget`` must agree to the micro-USD with a price computed here
independently, class by class, and re-pricing the analytics events with the same price version reproduces
every stored cost exactly."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import genai_prices
import openai

from gateway_tap.budgets.periods import usd_to_micros
from gateway_tap.budgets.store import open_store
from gateway_tap.dev.servers import free_port
from gateway_tap.pricing import PriceBook, reprice
from gateway_tap.settings import BudgetStoreSettings, parse_config
from schemas import Analytics, BudgetUsage
from tests.budgets.test_budget_tap import Clock, budget_tap, document, wait_until
from tests.support.collectors import collect_process, create_topics
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, by_request, cost_micros, read_events

os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
NOW = datetime(2026, 12, 10, 12, 0, tzinfo=UTC)
PROMPT = [{"role": "user", "content": "word " * 800}]  # 4,000 characters: 1,000 prompt tokens at the mock
PROMPT_TOKENS = 1_000
# The genai-prices 0.2.3 catalog (pinned in pyproject: these are its prices, USD per 1M tokens).
CATALOG = {
    "gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60, "cache_read_per_1m": 0.075},
    "o3-mini": {"input_per_1m": 1.10, "output_per_1m": 4.40, "cache_read_per_1m": 0.55},
    "claude-3-5-haiku-latest": {"input_per_1m": 0.80, "output_per_1m": 4.00, "cache_read_per_1m": 0.08,
                                "cache_write_per_1m": 1.00},
}


def mock_headers(read: int = 0, write: int = 0, reasoning: int = 0) -> dict[str, str]:
    return {"x-mock-cache-read-tokens": str(read), "x-mock-cache-write-tokens": str(write),
            "x-mock-reasoning-tokens": str(reasoning)}


async def test_sdk_calls_with_cache_and_reasoning_tokens_agree_to_the_micro_usd(
        budget_store_settings: BudgetStoreSettings, mock_llm: str, kafka_bootstrap: str, topic_prefix: str,
        tmp_path: Path) -> None:
    doc = document(mock_llm, kafka_bootstrap, topic_prefix, tmp_path, budget_store_settings,
                   [{"app_id": "test", "limit_usd": 100, "period": "monthly"}])
    for llm in doc["llms"]:
        llm["prices"] = {}  # every price from the catalog
    doc["collectors"] = {"budget": {"group_id": f"{topic_prefix}-budget", "group_instance_id": f"{topic_prefix}-b1",
                                    "session_timeout_ms": 10_000, "batch": {"max_events": 20, "max_wait_ms": 10},
                                    "metrics": {"port": free_port()}}}
    await create_topics(kafka_bootstrap, topic_prefix)
    collector = collect_process("cost-e2e", "budget", doc, tmp_path)
    await asyncio.to_thread(collector.start)
    store = await open_store(budget_store_settings)
    # (request id, model, prompt, completion, cache read, cache write, reasoning)
    calls: list[tuple[str, str, int, int, int, int, int]] = []
    try:
        async with budget_tap(doc, Clock(NOW)) as tap:
            oai = openai.AsyncOpenAI(base_url=f"{tap.url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
            raw = await oai.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=PROMPT, max_tokens=40,  # type: ignore[arg-type]
                extra_headers=mock_headers(read=768))
            reply = raw.parse()
            assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
            assert reply.usage.prompt_tokens_details.cached_tokens == 768  # the SDK reads what the tap passed on
            calls.append((raw.headers["x-request-id"], "gpt-4o-mini", PROMPT_TOKENS, 40, 768, 0, 0))

            stream = await oai.chat.completions.with_raw_response.create(
                model="o3-mini", messages=PROMPT, max_completion_tokens=300, stream=True,  # type: ignore[arg-type]
                extra_headers=mock_headers(read=512, reasoning=256))
            async for _chunk in stream.parse():  # the client did not ask for usage: the tap asked for it
                assert _chunk.usage is None
            calls.append((stream.headers["x-request-id"], "o3-mini", PROMPT_TOKENS, 300, 512, 0, 256))

            claude = anthropic.AsyncAnthropic(base_url=f"{tap.url}/llm/anthropic", api_key=APP_KEY, max_retries=0)
            message = await claude.messages.with_raw_response.create(
                model="claude-3-5-haiku-latest", max_tokens=50, messages=PROMPT,  # type: ignore[arg-type]
                extra_headers=mock_headers(read=600, write=300))
            parsed = message.parse()
            # Anthropic's input_tokens leaves the cache tokens out: 1,000 prompt tokens = 100 + 600 + 300.
            assert (parsed.usage.input_tokens, parsed.usage.cache_read_input_tokens,
                    parsed.usage.cache_creation_input_tokens) == (100, 600, 300)
            calls.append((message.headers["x-request-id"], "claude-3-5-haiku-latest", PROMPT_TOKENS, 50, 600, 300, 0))

            async with claude.messages.with_streaming_response.create(
                    model="claude-3-5-haiku-latest", max_tokens=70, messages=PROMPT,  # type: ignore[arg-type]
                    stream=True, extra_headers=mock_headers(read=200, write=700)) as streamed:
                request_id = streamed.headers["x-request-id"]
                async for _line in streamed.iter_lines():
                    pass
            calls.append((request_id, "claude-3-5-haiku-latest", PROMPT_TOKENS, 70, 200, 700, 0))

            # The Responses API, whole and streamed (typed events: usage in response.completed).
            answer = await oai.responses.with_raw_response.create(
                model="gpt-4o-mini", input=PROMPT, max_output_tokens=30,  # type: ignore[arg-type]
                extra_headers=mock_headers(read=400))
            parsed_answer = answer.parse()
            assert parsed_answer.usage is not None and parsed_answer.usage.input_tokens == PROMPT_TOKENS
            calls.append((answer.headers["x-request-id"], "gpt-4o-mini", PROMPT_TOKENS, 30, 400, 0, 0))
            events_seen: list[str] = []
            async with oai.responses.with_streaming_response.create(
                    model="o3-mini", input=PROMPT, max_output_tokens=90, stream=True,  # type: ignore[arg-type]
                    extra_headers=mock_headers(read=256, reasoning=64)) as streamed_response:
                request_id = streamed_response.headers["x-request-id"]
                async for event in await streamed_response.parse():
                    events_seen.append(event.type)
            assert events_seen[0] == "response.created" and events_seen[-1] == "response.completed"
            calls.append((request_id, "o3-mini", PROMPT_TOKENS, 90, 256, 0, 64))

            expected = {rid: cost_micros(CATALOG[model], prompt, completion, cache_read=read, cache_write=write,
                                         reasoning=reasoning)
                        for rid, model, prompt, completion, read, write, reasoning in calls}
            for rid, model, prompt, completion, read, write, reasoning in calls:
                # ...which is the catalog's own price up to the rounding of each class to whole micro-USD.
                exact = genai_prices.calc_price(
                    genai_prices.Usage(input_tokens=prompt, cache_read_tokens=read, cache_write_tokens=write,
                                       output_tokens=completion, output_reasoning_tokens=reasoning), model,
                    provider_id="openai" if "claude" not in model
                    else "anthropic", genai_request_timestamp=NOW).total_price * 1_000_000
                assert abs(expected[rid] - exact) <= Decimal("2.5"), (model, expected[rid], exact)

            events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3 * len(calls)))
            total = sum(expected.values())
            for rid, model, prompt, completion, read, write, reasoning in calls:
                analytics, usage = events[rid]["analytics"], events[rid]["budget_usage"]
                assert isinstance(analytics, Analytics) and isinstance(usage, BudgetUsage)
                for event in (analytics, usage):
                    assert (event.prompt_tokens, event.completion_tokens, event.cache_read_tokens or 0,
                            event.cache_write_tokens or 0, event.reasoning_tokens or 0) == (
                        prompt, completion, read, write, reasoning), model
                    assert event.cost_micros == expected[rid] and usd_to_micros(event.cost) == expected[rid]
                    assert event.cost_micros == sum((event.cost_input_micros or 0, event.cost_cache_read_micros or 0,
                                                     event.cost_cache_write_micros or 0, event.cost_output_micros or 0,
                                                     event.cost_reasoning_micros or 0))
                    assert event.price_source == f"catalog:{'anthropic' if 'claude' in model else 'openai'}/{model}"
                    assert event.price_version == analytics.price_version
                assert (analytics.request_model, analytics.operation) == (model, "chat")
                assert analytics.finish_reasons and analytics.response_id
                assert not analytics.tokens_estimated, model

            # The ledger (the budget collector's store) and GET /budget: the same micro-USD.
            async def recorded() -> bool:
                return (await store.spend("test", None, "monthly", NOW.date().replace(day=1))).requests >= len(calls)
            await wait_until(recorded, "the budget collector recorded every call")
            spend = await store.spend("test", None, "monthly", NOW.date().replace(day=1))
            assert spend.cost_micros == total

            async def reported() -> Any:
                async with aiohttp.ClientSession() as http, http.get(
                        f"{tap.url}/budget", headers={"authorization": f"Bearer {APP_KEY}"}) as resp:
                    return (await resp.json())["budgets"][0]

            async def budget_caught_up() -> bool:
                return usd_to_micros((await reported())["spent_usd"]) == total
            await wait_until(budget_caught_up, "GET /budget shows the recorded spend")

            # Re-pricing the analytics events with the same price settings reproduces every cost exactly.
            config = parse_config(doc)
            books = {llm.id: PriceBook.for_llm(llm) for llm in config.llms}
            for rid, *_ in calls:
                analytics = events[rid]["analytics"]
                assert isinstance(analytics, Analytics) and analytics.llm_id is not None
                book = books[analytics.llm_id]
                assert book.version == analytics.price_version
                again = reprice(book, analytics)
                assert again is not None
                assert (again.total_micros, again.input_micros, again.cache_read_micros, again.cache_write_micros,
                        again.output_micros, again.reasoning_micros, again.source) == (
                    analytics.cost_micros, analytics.cost_input_micros, analytics.cost_cache_read_micros,
                    analytics.cost_cache_write_micros, analytics.cost_output_micros, analytics.cost_reasoning_micros,
                    analytics.price_source)
    finally:
        await store.close()
        await asyncio.to_thread(collector.stop)
