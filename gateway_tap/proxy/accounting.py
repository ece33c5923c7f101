"""Token usage and cost of one LLM call: from the upstream's ``usage`` (JSON or SSE stream), else estimated.

OpenAI streams carry usage in a final chunk only when ``stream_options.include_usage``
is set, so the tap sets it (:func:`prepare_openai_stream`) and, when the client
did not ask for it, :class:`StreamAccounting` strips that extra chunk again.
Anthropic streams report input tokens in ``message_start`` and output tokens in
``message_delta``.

Usage is normalised to one meaning whatever the vendor (the token classes of :mod:`gateway_tap.pricing`):
``prompt_tokens`` counts every input token, cache reads and writes included (OpenAI's ``prompt_tokens``
already does; Anthropic reports ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` *beside*
``input_tokens``, so they are added in), and ``completion_tokens`` every output token, reasoning included
(both vendors count it so). ``cache_read_tokens``, ``cache_write_tokens`` and ``reasoning_tokens`` are
parts of those totals, never added on top.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway_tap.hooks import StreamEvent

CHARS_PER_TOKEN = 4


@dataclass(slots=True)
class Usage:
    """What one call consumed. ``found`` is False until an upstream usage report was seen.

    ``response_id``, ``finish_reasons`` and ``model`` are what the upstream said about its answer.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    estimated: bool = False
    found: bool = False
    invalid: bool = False
    """The upstream's report was broken (a count negative, not an integer, not a number or absurd): estimated."""
    model: str | None = None
    choices: int | None = None
    tool_calls: int | None = None
    response_id: str | None = None
    finish_reasons: list[str] | None = None
    uncached_input_tokens: int = 0
    """Anthropic's ``input_tokens`` (without the cache tokens), kept while a stream reports them apart."""

    def finish(self) -> None:
        if not self.total_tokens:
            self.total_tokens = self.prompt_tokens + self.completion_tokens

    def add_finish_reason(self, reason: Any) -> None:
        if isinstance(reason, str) and reason:
            if self.finish_reasons is None:
                self.finish_reasons = [reason]
            elif len(self.finish_reasons) < 128:  # one per choice; a hostile upstream cannot grow it forever
                self.finish_reasons.append(reason)


MAX_REPORTED_TOKENS = 100_000_000
"""More tokens than any one call has: a count above it is a broken report, not a bill."""


def _count(usage: Usage, value: Any) -> int:
    """A reported token count (absent: 0). A broken one (negative, not an integer, not a number, absurd) marks
    the whole report invalid (``usage.invalid``): it is then estimated, never taken as 0 (a free call)."""
    if value is None:
        return 0
    if type(value) is int and 0 <= value <= MAX_REPORTED_TOKENS:
        return value
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_REPORTED_TOKENS:
        return int(value)
    usage.invalid = True
    return 0


def _detail(usage: Usage, data: Mapping[str, Any], section: str, key: str) -> int | None:
    details = data.get(section)
    if isinstance(details, dict):
        value = details.get(key)
        if value is not None:
            return _count(usage, value)
    return None


def apply_openai_usage(usage: Usage, data: Mapping[str, Any]) -> None:
    """OpenAI's ``usage``: Chat Completions and embeddings (``prompt_tokens``...) or Responses (``input_tokens``...)."""
    usage.found = True
    if "prompt_tokens" in data or "input_tokens" not in data:
        usage.prompt_tokens = _count(usage, data.get("prompt_tokens"))
        usage.completion_tokens = _count(usage, data.get("completion_tokens"))
        input_details, output_details = "prompt_tokens_details", "completion_tokens_details"
    else:  # the Responses API
        usage.prompt_tokens = _count(usage, data.get("input_tokens"))
        usage.completion_tokens = _count(usage, data.get("output_tokens"))
        input_details, output_details = "input_tokens_details", "output_tokens_details"
    usage.total_tokens = _count(usage, data.get("total_tokens"))
    cached = _detail(usage, data, input_details, "cached_tokens")
    if cached is not None:
        usage.cache_read_tokens = cached
    written = _detail(usage, data, input_details, "cache_write_tokens")
    if written is not None:
        usage.cache_write_tokens = written
    reasoning = _detail(usage, data, output_details, "reasoning_tokens")
    if reasoning is not None:
        usage.reasoning_tokens = reasoning


def apply_anthropic_usage(usage: Usage, data: Mapping[str, Any]) -> None:
    """Anthropic's ``usage`` (a whole message's, or a stream's ``message_start`` / ``message_delta`` part):
    only the counts present are updated; ``prompt_tokens`` = input + cache read + cache write tokens."""
    usage.found = True
    if "input_tokens" in data:
        usage.uncached_input_tokens = _count(usage, data.get("input_tokens"))
    if "output_tokens" in data:
        usage.completion_tokens = _count(usage, data.get("output_tokens"))
    if data.get("cache_read_input_tokens") is not None:
        usage.cache_read_tokens = _count(usage, data["cache_read_input_tokens"])
    if data.get("cache_creation_input_tokens") is not None:
        usage.cache_write_tokens = _count(usage, data["cache_creation_input_tokens"])
    thinking = _detail(usage, data, "output_tokens_details", "thinking_tokens")
    if thinking is not None:
        usage.reasoning_tokens = thinking
    usage.prompt_tokens = usage.uncached_input_tokens + (usage.cache_read_tokens or 0) + (usage.cache_write_tokens or 0)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens


OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def output_limit(request: Any) -> int | None:
    """The request's limit on completion tokens per choice (the first of :data:`OUTPUT_LIMIT_FIELDS` set)."""
    if isinstance(request, dict):
        for name in OUTPUT_LIMIT_FIELDS:
            value = request.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def request_parameters(request: Any) -> tuple[int | None, float | None, float | None, bool | None]:
    """``(max_tokens, temperature, top_p, stream)`` as the request set them (None when it did not)."""
    if not isinstance(request, dict):
        return None, None, None, None
    stream = request.get("stream")
    return (output_limit(request), _number(request.get("temperature")), _number(request.get("top_p")),
            stream if isinstance(stream, bool) else None)


_OPERATIONS = {"completions": "text_completion", "embeddings": "embeddings", "messages": "chat",
               "responses": "chat"}


def operation_of(path: str) -> str:
    """The call's ``gen_ai.operation.name``: ``chat``, ``text_completion``, ``embeddings``, else the path's
    last segment (``models``...)."""
    path = path.partition("?")[0].rstrip("/")
    if path.endswith("chat/completions"):
        return "chat"
    last = path.rpartition("/")[2]
    return _OPERATIONS.get(last, last[:64] or "_OTHER")


def _text_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def estimate_prompt_tokens(request: Any) -> int:
    """Rough prompt size of a chat/messages/embeddings request body: characters / 4."""
    if not isinstance(request, dict):
        return 0
    chars = 0
    for message in request.get("messages") or ():
        if isinstance(message, dict):
            chars += _text_chars(message.get("content"))
    chars += _text_chars(request.get("system"))
    value = request.get("input")
    if isinstance(value, str):
        chars += len(value)
    elif isinstance(value, list):
        chars += sum(len(x) for x in value if isinstance(x, str))
    return max(1, chars // CHARS_PER_TOKEN) if chars else 0


def name_answer(usage: Usage, source: Mapping[str, Any]) -> None:
    """The answer's model and id as the response names them; the first naming wins (a stream repeats them)."""
    if usage.model is None and isinstance(source.get("model"), str):
        usage.model = source["model"]
    if usage.response_id is None and isinstance(source.get("id"), str):
        usage.response_id = source["id"][:256]


def response_finish_reason(usage: Usage, response: Mapping[str, Any]) -> None:
    """A Responses API response's finish reason: why it is incomplete (``max_output_tokens``...), else its status."""
    details = response.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, dict) else None
    usage.add_finish_reason(reason if reason is not None else response.get("status"))


def usage_from_body(vendor: str, body: bytes) -> Usage:
    """Usage, model, choices and tool calls from a non-streamed JSON response (empty Usage if none)."""
    usage = Usage()
    try:
        data = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        if b'"usage"' not in body:
            return usage
        try:  # a broken usage report (a NaN count) is invalid JSON, which the upstream's clients may still read
            data = json.loads(body)
        except ValueError:
            usage.invalid = True
            return usage
    if not isinstance(data, dict):
        return usage
    name_answer(usage, data)
    reported = data.get("usage")
    completion_chars = 0
    if vendor == "anthropic":
        if isinstance(reported, dict):
            apply_anthropic_usage(usage, reported)
        usage.add_finish_reason(data.get("stop_reason"))
        content = data.get("content")
        if isinstance(content, list):
            usage.choices = 1
            usage.tool_calls = sum(1 for b in content if isinstance(b, dict) and b.get("type") == "tool_use")
            completion_chars = _text_chars(content)
    else:
        if isinstance(reported, dict):
            apply_openai_usage(usage, reported)
        if data.get("object") == "response":  # the Responses API
            response_finish_reason(usage, data)
        choices = data.get("choices")
        if isinstance(choices, list):
            usage.choices = len(choices)
            calls = 0
            for choice in choices:
                if isinstance(choice, dict):
                    usage.add_finish_reason(choice.get("finish_reason"))
                message = choice.get("message") if isinstance(choice, dict) else None
                if isinstance(message, dict):
                    calls += len(message.get("tool_calls") or ())
                    completion_chars += _text_chars(message.get("content"))
            usage.tool_calls = calls
    if not usage.found or usage.invalid:
        usage.completion_tokens = completion_chars // CHARS_PER_TOKEN
    return usage


def prepare_openai_stream(body: dict[str, Any]) -> bool:
    """Make an OpenAI streaming request report usage. True when the client did not ask for it (strip it)."""
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return True


class StreamAccounting:
    """Incremental SSE reader: finds usage in the stream and, for OpenAI, optionally strips the usage chunk.

    Two ways in. :meth:`feed` takes raw chunks and returns the bytes to forward: when nothing
    must be stripped the chunk passes through untouched (the events are only inspected);
    otherwise only complete events are forwarded and a partial one waits for its end. When the
    events are parsed anyway (stream event hooks), :meth:`account` takes one parsed event.
    ``complete`` turns true once the upstream's final usage report was seen.
    """

    __slots__ = ("_buffer", "_strip", "_vendor", "complete", "events", "usage")

    def __init__(self, vendor: str, strip_usage_chunk: bool) -> None:
        self._vendor = vendor
        self._strip = strip_usage_chunk
        self._buffer = b""
        self.usage = Usage()
        self.events = 0
        self.complete = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._buffer + chunk if self._buffer else chunk
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buffer = data
            return b"" if self._strip else chunk
        complete, self._buffer = data[: end + 2], data[end + 2 :]
        kept: list[bytes] = []
        dropped = False
        for event in complete.split(b"\n\n")[:-1]:
            if self._inspect(event):
                kept.append(event + b"\n\n")
            else:
                dropped = True
        if not self._strip:
            return chunk
        if not dropped:
            return complete
        return b"".join(kept)

    @property
    def pending_bytes(self) -> int:
        """The bytes of an event not complete yet, held until its end."""
        return len(self._buffer)

    def flush(self) -> bytes:
        """Whatever is left when the upstream ends (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        if rest.strip():
            self._inspect(rest)
        return rest if self._strip else b""

    def account(self, event: StreamEvent) -> bool:
        """Account one parsed event; False when it is the injected usage-only chunk to strip."""
        self.events += 1
        payload = event.json()
        if not isinstance(payload, dict):
            if payload is None and not event.done and '"usage"' in event.data:
                self.usage.invalid = True  # a usage report that is not JSON (a NaN count...)
            return True
        if self._vendor == "anthropic":
            self._anthropic(event.event or payload.get("type"), payload)
            return True
        return self._openai(payload)

    def _inspect(self, event: bytes) -> bool:
        """Account one raw event; False when it is the injected usage-only chunk to strip."""
        if not event.strip():
            return True
        self.events += 1
        if self._vendor == "anthropic":
            # Byte checks first: only these few events carry what accounting needs, so most are never parsed.
            if b"message_start" in event or b"message_delta" in event:
                payload = _data_of(event)
                if isinstance(payload, dict):
                    self._anthropic(payload.get("type"), payload)
                elif b'"usage"' in event:
                    self.usage.invalid = True  # a usage report that is not JSON (a NaN count...)
            elif b"tool_use" in event and b"content_block_start" in event:
                self.usage.tool_calls = (self.usage.tool_calls or 0) + 1
            return True
        if self.usage.model is None or (b'"usage"' in event and b'"usage":null' not in event
                                        and b'"usage": null' not in event) \
                or b'"finish_reason":"' in event or b'"finish_reason": "' in event:  # a choice's last chunk
            payload = _data_of(event)
            if isinstance(payload, dict):
                return self._openai(payload)
            if b'"usage"' in event and b"[DONE]" not in event:
                self.usage.invalid = True  # a usage report that is not JSON (a NaN count...)
        return True

    def _anthropic(self, kind: Any, payload: dict[str, Any]) -> None:
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, dict):
                name_answer(self.usage, message)
                if isinstance(message.get("usage"), dict):
                    apply_anthropic_usage(self.usage, message["usage"])
        elif kind == "message_delta":
            delta = payload.get("delta")
            if isinstance(delta, dict):
                self.usage.add_finish_reason(delta.get("stop_reason"))
            if isinstance(payload.get("usage"), dict):
                apply_anthropic_usage(self.usage, payload["usage"])
                self.complete = True
        elif kind == "content_block_start":
            block = payload.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                self.usage.tool_calls = (self.usage.tool_calls or 0) + 1

    def _openai(self, payload: dict[str, Any]) -> bool:
        kind = payload.get("type")
        if isinstance(kind, str) and kind.startswith("response."):  # the Responses API's typed events
            self._responses(payload)
            return True
        name_answer(self.usage, payload)
        choices = payload.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason") is not None:
                    self.usage.add_finish_reason(choice["finish_reason"])
        reported = payload.get("usage")
        if isinstance(reported, dict):
            apply_openai_usage(self.usage, reported)
            self.complete = True
            if self._strip and payload.get("choices") == []:
                return False
        return True

    def _responses(self, payload: dict[str, Any]) -> None:
        """A Responses API event: ``response.created`` names the model, ``response.completed`` (or ``.incomplete``,
        ``.failed``) carries the whole response with its ``usage``, read as a whole answer's."""
        response = payload.get("response")
        if not isinstance(response, dict):
            return
        name_answer(self.usage, response)
        reported = response.get("usage")
        if isinstance(reported, dict):
            apply_openai_usage(self.usage, reported)
            response_finish_reason(self.usage, response)
            self.complete = True

    def estimate_completion_tokens(self, events: int | None = None) -> int:
        """Without a usage report: one token per content event is how both vendors stream.

        ``events`` counts the events the client got when that differs from what the upstream sent
        (hooks dropped some, or ended the stream early); default: every event accounted.
        """
        seen = self.events if events is None else events
        return max(0, seen - (4 if self._vendor == "anthropic" else 2))


def _data_of(event: bytes) -> Any:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            raw = line[5:].strip()
            if raw == b"[DONE]":
                return None
            try:
                return orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
    return None
