"""``llms``: the upstreams the tap routes ``/llm/{id}/...`` to, with their timeouts and prices."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

from pydantic import Field

from gateway_tap.settings.base import Id, Section


class ModelPrice(Section):
    """Price of one model in ``currency`` per million tokens, by token class (docs/pricing.md)."""

    input_per_1m: float = Field(default=0.0, ge=0, description="Price of one million prompt tokens.")
    output_per_1m: float = Field(default=0.0, ge=0, description="Price of one million completion tokens.")
    cache_read_per_1m: float | None = Field(
        default=None, ge=0, description="Price of one million prompt tokens read from the provider's cache "
                                        "(default: input_per_1m).")
    cache_write_per_1m: float | None = Field(
        default=None, ge=0, description="Price of one million prompt tokens written to the provider's cache "
                                        "(default: input_per_1m).")
    reasoning_per_1m: float | None = Field(
        default=None, ge=0, description="Price of one million reasoning (thinking) tokens (default: output_per_1m).")


class LLMTimeouts(Section):
    """Upstream timeouts in seconds; exceeding one answers 504."""

    connect_s: float = Field(default=5.0, gt=0, description="Opening the connection to the upstream.")
    first_byte_s: float = Field(default=60.0, gt=0, description="From sending the request to the response headers.")
    total_s: float = Field(default=600.0, gt=0, description="Whole exchange, including a streamed body.")


MIB = 1024 * 1024


class LLMLimits(Section):
    """Caps on what the upstream sends back, counted after decompression (a gzip bomb is cut, never inflated
    whole). Over a cap: 502 ``upstream_response_too_large`` when nothing was sent yet, else the stream ends;
    either way recorded."""

    max_response_bytes: int = Field(default=32 * MIB, gt=0,
                                    description="A non-streamed body (held whole to account it and run the body "
                                                "hooks).")
    max_stream_bytes: int = Field(default=256 * MIB, gt=0,
                                  description="A streamed body in total (relayed as it arrives; the cap ends an "
                                              "endless stream).")
    max_event_bytes: int = Field(default=8 * MIB, gt=0,
                                 description="One server-sent event of a stream (held until its end to read "
                                             "usage and run the stream hooks).")


class LLMConfig(Section):
    """One upstream the tap routes ``/llm/{id}/...`` to."""

    id: Id = Field(description="Unique; the {id} in /llm/{id}/.")
    vendor: Literal["openai", "anthropic"] = Field(description="API style: how usage is read and the key is sent.")
    upstream_url: str = Field(pattern=r"^https?://", description="Base URL; the rest of the path is appended.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the upstream credential.")
    timeouts: LLMTimeouts = Field(default_factory=LLMTimeouts)  # type: ignore[arg-type]
    limits: LLMLimits = Field(default_factory=LLMLimits)  # type: ignore[arg-type]
    currency: str = Field(default="USD", description="Currency of prices (budgets count USD only).")
    prices: dict[str, ModelPrice] = Field(
        default_factory=dict, description="Overrides of the price catalog, per model (exact name as the upstream "
                                          "reports it or the client asks for it); the key '*' prices any model "
                                          "neither these nor the catalog price.")
    price_catalog: str | None = Field(
        default=None, pattern=r"^[a-z0-9._-]+$",
        description="The genai-prices provider whose catalog prices this LLM's models (default: the vendor, "
                    "openai or anthropic; e.g. azure, groq, deepseek for OpenAI-compatible upstreams); "
                    "'none': only `prices` apply.")


def unknown_llm_refs(ids: Sequence[str], known: Collection[str]) -> list[tuple[int, str]]:
    """``(index, id)`` of each reference in ``ids`` that names no LLM of ``known`` (``*`` names them all)."""
    return [(i, llm_id) for i, llm_id in enumerate(ids) if llm_id != "*" and llm_id not in known]
