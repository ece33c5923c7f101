"""Pricing (gateway_tap/pricing.py) against the genai-prices catalog itself: the vendors' usage shapes (cache
reads and writes, reasoning, streamed usage) read by the tap's accounting and priced by a PriceBook must cost
what the catalog's own extractor and calculator say, class by class. No servers."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import orjson
import pytest

from gateway_tap.pricing import CLASSES, NO_CATALOG, PriceBook, split_tokens
from gateway_tap.proxy.accounting import StreamAccounting, Usage, usage_from_body
from gateway_tap.settings import ModelPrice
from tests.proxy.test_accounting import sse

AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

OPENAI_CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 12_345, "completion_tokens": 678, "total_tokens": 13_023,
                         "prompt_tokens_details": {"cached_tokens": 8_192},
                         "completion_tokens_details": {"reasoning_tokens": 0}}}
OPENAI_REASONING = {"id": "chatcmpl-2", "object": "chat.completion", "model": "o3-mini-2025-01-31",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "42"},
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 2_000, "completion_tokens": 5_000, "total_tokens": 7_000,
                              "prompt_tokens_details": {"cached_tokens": 1_024},
                              "completion_tokens_details": {"reasoning_tokens": 4_480}}}
OPENAI_RESPONSES = {"id": "resp_1", "object": "response", "model": "gpt-4o-2024-08-06",
                    "usage": {"input_tokens": 3_000, "output_tokens": 900, "total_tokens": 3_900,
                              "input_tokens_details": {"cached_tokens": 2_048},
                              "output_tokens_details": {"reasoning_tokens": 0}}}
ANTHROPIC_CACHED = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
                    "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                    "usage": {"input_tokens": 1_100, "output_tokens": 321, "cache_read_input_tokens": 40_000,
                              "cache_creation_input_tokens": 2_500}}
ANTHROPIC_LONG = {"id": "msg_2", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
                  "content": [{"type": "text", "text": "hi"}], "stop_reason": "max_tokens",
                  "usage": {"input_tokens": 150_000, "output_tokens": 4_000, "cache_read_input_tokens": 60_000,
                            "cache_creation_input_tokens": 1_000}}  # 211,000 prompt tokens: the >200k tier

CASES = [("openai", "chat", OPENAI_CHAT), ("openai", "chat", OPENAI_REASONING),
         ("openai", "responses", OPENAI_RESPONSES), ("anthropic", "default", ANTHROPIC_CACHED),
         ("anthropic", "default", ANTHROPIC_LONG)]


def catalog_says(vendor: str, flavor: str, body: dict[str, Any]) -> tuple[genai_prices.types.Usage, Decimal, Decimal]:
    """The catalog's own reading and price of a response: (usage, input price, output price) in micro-USD."""
    extracted = genai_prices.extract_usage(body, provider_id=vendor, api_flavor=flavor)
    calc = extracted.calc_price(genai_request_timestamp=AT)
    return extracted.usage, calc.input_price * 1_000_000, calc.output_price * 1_000_000


def stream_of(vendor: str, body: dict[str, Any]) -> bytes:
    """The same answer as the vendor streams it (usage in the final chunk / response.completed / message_start +
    message_delta)."""
    if body.get("object") == "response":  # the Responses API: typed events, usage in response.completed
        created = {**body, "status": "in_progress", "output": [], "usage": None}
        return b"".join([
            sse({"type": "response.created", "sequence_number": 0, "response": created}, "response.created"),
            sse({"type": "response.output_text.delta", "sequence_number": 1, "item_id": "msg_1", "output_index": 0,
                 "content_index": 0, "delta": "hi"}, "response.output_text.delta"),
            sse({"type": "response.completed", "sequence_number": 2, "response": body}, "response.completed")])
    if vendor == "openai":
        return b"".join([
            sse({"id": body["id"], "object": "chat.completion.chunk", "model": body["model"],
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}],
                 "usage": None}),
            sse({"id": body["id"], "object": "chat.completion.chunk", "model": body["model"],
                 "choices": [{"index": 0, "delta": {}, "finish_reason": body["choices"][0]["finish_reason"]}],
                 "usage": None}),
            sse({"id": body["id"], "object": "chat.completion.chunk", "model": body["model"], "choices": [],
                 "usage": body["usage"]}),
            b"data: [DONE]\n\n"])
    usage = body["usage"]
    start = {**usage, "output_tokens": 1}
    return b"".join([
        sse({"type": "message_start", "message": {**body, "content": [], "stop_reason": None, "usage": start}},
            "message_start"),
        sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            "content_block_delta"),
        sse({"type": "message_delta", "delta": {"stop_reason": body["stop_reason"]},
             "usage": {"output_tokens": usage["output_tokens"]}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop")])


def read(vendor: str, body: dict[str, Any], streamed: bool) -> Usage:
    if not streamed:
        return usage_from_body(vendor, orjson.dumps(body))
    acct = StreamAccounting(vendor, strip_usage_chunk=False)
    data = stream_of(vendor, body)
    for i in range(0, len(data), 37):  # cut anywhere
        acct.feed(data[i:i + 37])
    acct.flush()
    assert acct.complete
    return acct.usage


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(("vendor", "flavor", "body"), CASES, ids=[c[2]["id"] for c in CASES])
def test_usage_shapes_cost_what_the_catalog_says(vendor: str, flavor: str, body: dict[str, Any],
                                                 streamed: bool) -> None:
    usage = read(vendor, body, streamed)
    expected, input_micros, output_micros = catalog_says(vendor, flavor, body)
    # The same token classes as the catalog's own extractor: nothing double counted, nothing left out.
    assert usage.prompt_tokens == expected.input_tokens
    assert (usage.cache_read_tokens or 0) == expected.cache_read_tokens
    assert (usage.cache_write_tokens or 0) == expected.cache_write_tokens
    assert usage.completion_tokens == expected.output_tokens
    assert (usage.reasoning_tokens or 0) == expected.output_reasoning_tokens
    assert usage.model == body["model"] and usage.response_id == body["id"]
    cost = PriceBook("llm", vendor, {}).cost(usage, usage.model, at=AT)
    assert cost is not None and cost.source.startswith(f"catalog:{vendor}/")
    # Each class is rounded half up to whole micro-USD once, so each direction is within half a micro-USD per
    # class of the catalog's exact decimal price.
    spent_in = cost.input_micros + cost.cache_read_micros + cost.cache_write_micros
    spent_out = cost.output_micros + cost.reasoning_micros
    assert abs(spent_in - input_micros) <= Decimal("1.5") and abs(spent_out - output_micros) <= 1
    assert cost.total_micros == spent_in + spent_out


def test_anthropic_cache_tokens_are_added_to_the_prompt_openai_cached_tokens_are_inside_it() -> None:
    anthropic = usage_from_body("anthropic", orjson.dumps(ANTHROPIC_CACHED))
    assert (anthropic.prompt_tokens, anthropic.cache_read_tokens, anthropic.cache_write_tokens) == (43_600, 40_000,
                                                                                                    2_500)
    assert split_tokens(anthropic) == (1_100, 40_000, 2_500, 321, 0)
    openai = usage_from_body("openai", orjson.dumps(OPENAI_REASONING))
    assert (openai.prompt_tokens, openai.cache_read_tokens, openai.reasoning_tokens) == (2_000, 1_024, 4_480)
    assert split_tokens(openai) == (976, 1_024, 0, 520, 4_480)
    assert openai.finish_reasons == ["length"]


def test_classes_are_priced_at_their_own_rates_rounded_half_up_once_each() -> None:
    price = ModelPrice(input_per_1m=3, output_per_1m=15, cache_read_per_1m=0.3, cache_write_per_1m=3.75,
                       reasoning_per_1m=20)
    book = PriceBook("llm", "anthropic", {"m": price}, NO_CATALOG)
    usage = Usage(prompt_tokens=1_000_001, completion_tokens=3, cache_read_tokens=1_000_000, cache_write_tokens=0,
                  reasoning_tokens=1)
    cost = book.cost(usage, "m", at=AT)
    assert cost is not None
    # 1 uncached token x 3 = 3 micro; 1M cached x 0.3 = 300,000; 2 output x 15 = 30; 1 reasoning x 20 = 20
    assert (cost.input_micros, cost.cache_read_micros, cost.cache_write_micros, cost.output_micros,
            cost.reasoning_micros, cost.total_micros) == (3, 300_000, 0, 30, 20, 300_053)
    half = book.cost(Usage(prompt_tokens=1, completion_tokens=0), "m", at=AT)
    assert half is not None and half.input_micros == 3
    cheap = PriceBook("llm", "openai", {"c": ModelPrice(input_per_1m=0.15)}, NO_CATALOG)
    rounded = [cheap.cost(Usage(prompt_tokens=n), "c", at=AT) for n in (3, 4)]
    assert [c.total_micros for c in rounded if c] == [0, 1]  # 0.45 -> 0, 0.6 -> 1 (half up)


def test_which_price_applies_config_then_catalog_then_wildcard() -> None:
    prices = {"gpt-4o-mini": ModelPrice(input_per_1m=1, output_per_1m=2), "*": ModelPrice(input_per_1m=9)}
    book = PriceBook("openai", "openai", prices)
    plan = book.plan("gpt-4o-mini", at=AT)
    assert plan is not None and plan.source == "config:gpt-4o-mini"
    assert plan.base.per_1m_usd() == {"input": 1, "cache_read": 1, "cache_write": 1, "output": 2, "reasoning": 2}
    dated = book.plan("gpt-4o-2024-08-06", at=AT)  # a dated name the catalog matches to its model
    assert dated is not None and (dated.source, dated.entry) == ("catalog:openai/gpt-4o", "gpt-4o")
    assert dated.base.per_1m_usd()["cache_read"] == 1.25
    wildcard = book.plan("my-finetune", at=AT)
    assert wildcard is not None and wildcard.source == "config:*"
    # The response's model first, then the requested one: an unknown response model falls back on the request's.
    assert book.plan("my-finetune", "gpt-4o-mini", at=AT).source == "config:gpt-4o-mini"  # type: ignore[union-attr]
    assert PriceBook("openai", "openai", {}, NO_CATALOG).plan("gpt-4o", at=AT) is None
    assert PriceBook("openai", "openai", {}).plan("my-finetune", at=AT) is None
    assert PriceBook("eu", "openai", {}, currency="EUR").plan("gpt-4o", at=AT) is None  # the catalog is USD


def test_bad_catalog_settings_fail_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"llms\[x\]\.price_catalog: 'nope' is not a provider"):
        PriceBook("x", "openai", {}, "nope")
    with pytest.raises(ValueError, match=r"llms\[x\]\.price_catalog: the catalog prices in USD"):
        PriceBook("x", "openai", {}, "openai", currency="EUR")
    assert PriceBook("x", "openai", {}, "groq").plan("llama-3.3-70b-versatile", at=AT) is not None


def test_price_version_is_the_catalog_and_a_hash_of_the_price_settings() -> None:
    a = PriceBook("a", "openai", {"m": ModelPrice(input_per_1m=1)})
    assert a.version.startswith(f"genai-prices-{genai_prices.__version__}+") and len(a.version.split("+")[1]) == 12
    assert PriceBook("b", "openai", {"m": ModelPrice(input_per_1m=1)}).version == a.version  # the id is not hashed
    assert PriceBook("a", "openai", {"m": ModelPrice(input_per_1m=1.01)}).version != a.version
    assert PriceBook("a", "openai", {"m": ModelPrice(input_per_1m=1)}, "azure").version != a.version
    assert PriceBook("a", "openai", {}, NO_CATALOG).version.startswith("none+")


def test_tiers_charge_every_token_at_the_tier_rate() -> None:
    book = PriceBook("a", "anthropic", {})
    below = book.cost(Usage(prompt_tokens=200_000, completion_tokens=1_000), "claude-sonnet-4-5", at=AT)
    above = book.cost(Usage(prompt_tokens=200_001, completion_tokens=1_000), "claude-sonnet-4-5", at=AT)
    assert below is not None and above is not None
    assert (below.input_micros, below.output_micros) == (600_000, 15_000)  # $3 / $15 per 1M
    assert (above.input_micros, above.output_micros) == (1_200_006, 22_500)  # $6 / $22.50 per 1M above 200k


def test_dated_catalog_prices_apply_by_the_time_of_the_call() -> None:
    book = PriceBook("a", "openai", {})
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=0)
    before = book.cost(usage, "o3", at=datetime(2025, 6, 9, 23, 59, tzinfo=UTC))
    after = book.cost(usage, "o3", at=datetime(2025, 6, 10, 0, 0, tzinfo=UTC))
    again = book.cost(usage, "o3", at=datetime(2025, 6, 9, 12, 0, tzinfo=UTC))  # the cached window is re-checked
    assert [c.input_micros for c in (before, after, again) if c] == [10_000_000, 2_000_000, 10_000_000]


def test_split_caps_over_reported_classes_by_their_totals() -> None:
    broken = Usage(prompt_tokens=10, completion_tokens=5, cache_read_tokens=8, cache_write_tokens=8,
                   reasoning_tokens=9)
    parts = split_tokens(broken)
    assert parts == (0, 8, 2, 0, 5) and sum(parts) == 15
    assert CLASSES == ("input", "cache_read", "cache_write", "output", "reasoning")


def test_model_names_from_clients_cannot_grow_the_cache_without_bound() -> None:
    book = PriceBook("a", "openai", {"*": ModelPrice(input_per_1m=1)})
    for i in range(5_000):
        assert book.plan(f"random-{i}", at=AT) is not None
    assert len(book._cache) <= 4096
