"""Unit tests of gateway_tap/proxy/accounting.py: SSE streams read in arbitrary pieces, usage found and
(for OpenAI, when the tap asked for it) stripped, non-streamed bodies, estimates. No servers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import pytest

from gateway_tap.proxy.accounting import (
    StreamAccounting,
    Usage,
    estimate_prompt_tokens,
    prepare_openai_stream,
    usage_from_body,
)


def sse(data: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    return prefix + b"data: " + payload + b"\n\n"


def openai_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


OPENAI_USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
                "prompt_tokens_details": {"cached_tokens": 4}}
OPENAI_USAGE_CHUNK = sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024-07-18",
                          "choices": [], "usage": OPENAI_USAGE})
OPENAI_CONTENT = [
    openai_chunk({"role": "assistant", "content": ""}, usage=None),
    openai_chunk({"content": "Grüße, 世界 "}, usage=None),  # multi-byte: 2-byte ü/ß, 3-byte CJK
    openai_chunk({"content": "🌍"}, usage=None),  # 4 bytes
    openai_chunk({}, "stop", usage=None),
]
DONE = b"data: [DONE]\n\n"
OPENAI_STREAM = b"".join([*OPENAI_CONTENT, OPENAI_USAGE_CHUNK, DONE])
OPENAI_STREAM_STRIPPED = b"".join([*OPENAI_CONTENT, DONE])

ANTHROPIC_STREAM = b"".join([
    sse({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-3-5-haiku-20241022",
        "content": [], "stop_reason": None,
        "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5,
                  "cache_creation_input_tokens": 7}}}, "message_start"),
    sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        "content_block_start"),
    sse({"type": "ping"}, "ping"),
    sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Grüße — 世界"}},
        "content_block_delta"),
    sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
    sse({"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}},
        "content_block_start"),
    sse({"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Zürich\"}"}}, "content_block_delta"),
    sse({"type": "content_block_stop", "index": 1}, "content_block_stop"),
    sse({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 42}}, "message_delta"),
    sse({"type": "message_stop"}, "message_stop"),
])


def pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start:start + size]


def run(acct: StreamAccounting, chunks: Iterable[bytes]) -> bytes:
    return b"".join(acct.feed(chunk) for chunk in chunks) + acct.flush()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_openai_stream_split_anywhere_strips_the_injected_usage_chunk(size: int) -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    assert run(acct, pieces(OPENAI_STREAM, size)) == OPENAI_STREAM_STRIPPED
    assert (acct.usage.prompt_tokens, acct.usage.completion_tokens, acct.usage.total_tokens) == (12, 3, 15)
    assert acct.usage.cache_read_tokens == 4
    assert acct.usage.found is True
    assert acct.usage.model == "gpt-4o-mini-2024-07-18"
    assert acct.events == 6  # four content chunks, the usage chunk, [DONE]


@pytest.mark.parametrize("size", [1, 5, 10_000])
def test_openai_stream_the_client_asked_usage_for_passes_through_byte_for_byte(size: int) -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=False)
    chunks = list(pieces(OPENAI_STREAM, size))
    assert [acct.feed(chunk) for chunk in chunks] == chunks  # each read forwarded as it came, at once
    assert acct.flush() == b""
    assert (acct.usage.prompt_tokens, acct.usage.completion_tokens, acct.usage.total_tokens) == (12, 3, 15)
    assert acct.usage.found is True


def test_a_multibyte_character_split_across_reads_arrives_whole() -> None:
    emoji_at = OPENAI_STREAM.index("🌍".encode())
    cjk_at = OPENAI_STREAM.index("世".encode())
    cuts = [cjk_at + 1, cjk_at + 2, emoji_at + 1, emoji_at + 3]  # inside the 3-byte and the 4-byte character
    chunks = [OPENAI_STREAM[a:b] for a, b in zip([0, *cuts], [*cuts, len(OPENAI_STREAM)], strict=True)]
    with pytest.raises(UnicodeDecodeError):
        chunks[1].decode()  # the split really falls inside a character
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    out = run(acct, chunks)
    assert out == OPENAI_STREAM_STRIPPED
    texts = [orjson.loads(line[6:])["choices"][0]["delta"].get("content") for line in out.split(b"\n\n")
             if line.startswith(b"data: {")]
    assert "".join(t or "" for t in texts) == "Grüße, 世界 🌍"
    assert acct.usage.total_tokens == 15


def test_a_usage_event_split_inside_a_multibyte_character_is_still_read() -> None:
    delta = sse({"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "—終"},
                 "usage": {"output_tokens": 9}}, "message_delta")
    cut = delta.index("終".encode()) + 1
    acct = StreamAccounting("anthropic", strip_usage_chunk=False)
    assert acct.feed(delta[:cut]) == delta[:cut]
    assert acct.usage.found is False
    assert acct.feed(delta[cut:]) == delta[cut:]
    assert (acct.usage.completion_tokens, acct.usage.found) == (9, True)


def test_usage_only_in_the_last_chunk_is_found_only_then() -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    forwarded = b"".join(acct.feed(chunk) for chunk in OPENAI_CONTENT)
    assert forwarded == b"".join(OPENAI_CONTENT)
    assert acct.usage.found is False
    assert acct.usage.model == "gpt-4o-mini-2024-07-18"  # from the first chunk already
    assert acct.feed(OPENAI_USAGE_CHUNK + DONE) == DONE
    assert (acct.usage.prompt_tokens, acct.usage.completion_tokens, acct.usage.found) == (12, 3, True)


def test_an_unterminated_last_event_is_accounted_at_flush() -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    unterminated = OPENAI_USAGE_CHUNK.rstrip(b"\n")
    assert acct.feed(b"".join(OPENAI_CONTENT) + unterminated) == b"".join(OPENAI_CONTENT)
    assert acct.usage.found is False
    assert acct.flush() == unterminated  # not a complete event, so it is forwarded as it came
    assert (acct.usage.total_tokens, acct.usage.found) == (15, True)


def test_done_is_forwarded_and_counted_but_carries_nothing() -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    assert acct.feed(DONE) == DONE
    assert acct.flush() == b""
    assert acct.events == 1
    assert acct.usage == Usage()


def test_usage_null_in_content_chunks_is_not_a_report() -> None:
    acct = StreamAccounting("openai", strip_usage_chunk=True)
    acct.feed(b"".join(OPENAI_CONTENT) + DONE)
    assert acct.usage.found is False
    assert acct.estimate_completion_tokens() == 3  # 5 events minus the role and [DONE] events


@pytest.mark.parametrize("size", [1, 4, 10_000])
def test_anthropic_event_types(size: int) -> None:
    acct = StreamAccounting("anthropic", strip_usage_chunk=False)
    chunks = list(pieces(ANTHROPIC_STREAM, size))
    assert b"".join(acct.feed(c) for c in chunks) == ANTHROPIC_STREAM
    assert acct.flush() == b""
    usage = acct.usage
    # input_tokens counts only the uncached rest: the prompt is 25 + 5 cache reads + 7 cache writes
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (37, 42, 79)
    assert (usage.cache_read_tokens, usage.cache_write_tokens) == (5, 7)
    assert usage.model == "claude-3-5-haiku-20241022"
    assert (usage.response_id, usage.finish_reasons) == ("msg_1", ["tool_use"])
    assert usage.tool_calls == 1
    assert usage.found is True
    assert acct.events == 10
    assert acct.estimate_completion_tokens() == 6


def test_anthropic_message_start_alone_reports_input_tokens() -> None:
    acct = StreamAccounting("anthropic", strip_usage_chunk=False)
    acct.feed(ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: content_block_start")])
    assert (acct.usage.prompt_tokens, acct.usage.completion_tokens, acct.usage.total_tokens) == (37, 1, 38)


def test_usage_from_openai_body() -> None:
    body = orjson.dumps({"model": "gpt-4o", "usage": OPENAI_USAGE, "choices": [
        {"message": {"role": "assistant", "content": "hi", "tool_calls": [{"id": "a"}, {"id": "b"}]}},
        {"message": {"role": "assistant", "content": "hello"}}]})
    usage = usage_from_body("openai", body)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.cache_read_tokens) == (12, 3, 15, 4)
    assert (usage.model, usage.choices, usage.tool_calls, usage.found) == ("gpt-4o", 2, 2, True)


def test_usage_from_anthropic_body() -> None:
    body = orjson.dumps({"model": "claude-3-5-haiku-20241022", "usage": {"input_tokens": 10, "output_tokens": 20},
                         "content": [{"type": "text", "text": "x"}, {"type": "tool_use", "id": "t", "input": {}}]})
    usage = usage_from_body("anthropic", body)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 20, 30)
    assert (usage.choices, usage.tool_calls, usage.found) == (1, 1, True)


def test_usage_from_a_body_without_usage_estimates_the_completion() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "x" * 40}}]})
    usage = usage_from_body("openai", body)
    assert (usage.found, usage.completion_tokens, usage.prompt_tokens) == (False, 10, 0)
    assert usage_from_body("openai", b"not json") == Usage()
    assert usage_from_body("openai", b"[1, 2]") == Usage()


def test_estimate_prompt_tokens() -> None:
    request = {"system": "abcd" * 2, "messages": [{"role": "user", "content": "x" * 12},
                                                  {"role": "user", "content": [{"type": "text", "text": "y" * 8}]}]}
    assert estimate_prompt_tokens(request) == 7  # (8 + 12 + 8) / 4
    assert estimate_prompt_tokens({"input": ["abcd", "efgh", 3]}) == 2
    assert estimate_prompt_tokens({"messages": [{"content": "ab"}]}) == 1  # at least one token
    assert estimate_prompt_tokens({}) == 0
    assert estimate_prompt_tokens("text") == 0


def test_prepare_openai_stream() -> None:
    body: dict[str, Any] = {"stream": True}
    assert prepare_openai_stream(body) is True
    assert body["stream_options"] == {"include_usage": True}
    body = {"stream": True, "stream_options": {"include_obfuscation": False}}
    assert prepare_openai_stream(body) is True
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert prepare_openai_stream(body) is False
    assert body["stream_options"] == {"include_usage": True}
