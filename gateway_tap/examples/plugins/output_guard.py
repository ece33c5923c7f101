"""Blocks answers whose text matches a configured pattern: output moderation after the upstream answered.

config::

    patterns:                 # Python regular expressions, matched case-insensitively against the answer's text
      - "\\b\\d{3}-\\d{2}-\\d{4}\\b"   # US social security numbers
      - "internal use only"
    message: "the answer was blocked by the output guard"   # optional
    window_chars: 1024        # optional: how much of a streamed answer a match may span

- A whole answer (``on_response_body``) that matches never reaches the client: it gets
  ``403 content_blocked`` instead, and only the prompt is billed.
- A streamed answer (``on_stream_event``) is checked event by event on the text streamed so far
  (the last ``window_chars`` characters of each choice), so a match spread over several events is
  found; the stream then ends with an error event that the ``openai`` and ``anthropic`` SDKs raise.
  Events before the one that completed the match were already sent: a guard that must never let a
  partial match out holds events back (not done here, to keep streaming latency).

Reads OpenAI chat completions (``choices[].message.content`` / ``choices[].delta.content``) and
Anthropic messages (``content[].text`` / ``content_block_delta`` text deltas); other bodies pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from gateway_tap.hooks import HookContext, HookResult, PluginServices, StreamEvent, TapResponse


def answer_texts(body: Any) -> Iterator[str]:
    """The text parts of a whole OpenAI or Anthropic answer."""
    if not isinstance(body, dict):
        return
    for choice in body.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]
    for block in body.get("content") or ():
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            yield block["text"]


def delta_text(payload: Any) -> tuple[int, str] | None:
    """(choice index, text) of one streamed OpenAI chunk or Anthropic text delta, else None."""
    if not isinstance(payload, dict):
        return None
    if payload.get("type") == "content_block_delta":
        delta = payload.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("text"), str):
            return int(payload.get("index") or 0), delta["text"]
        return None
    choices = payload.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        delta = choices[0].get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            return int(choices[0].get("index") or 0), delta["content"]
    return None


class OutputGuard:
    def config_schema(self) -> Mapping[str, Any]:
        return {"type": "object", "additionalProperties": False, "required": ["patterns"],
                "properties": {"patterns": {"type": "array", "minItems": 1,
                                            "items": {"type": "string", "minLength": 1}},
                               "message": {"type": "string"},
                               "window_chars": {"type": "integer", "minimum": 16}}}

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        await self.on_config_change(config)

    async def on_config_change(self, config: Mapping[str, Any]) -> None:
        # One assignment each: a request sees the old or the new settings, never half.
        self.regex = re.compile("|".join(f"(?:{p})" for p in config["patterns"]), re.IGNORECASE)
        self.message = str(config.get("message", "the answer was blocked by the output guard"))
        self.window_chars = int(config.get("window_chars", 1024))

    def _blocked(self) -> HookResult:
        return HookResult.stop(403, self.message, code="content_blocked")

    async def on_response_body(self, response: TapResponse, body: bytes, ctx: HookContext) -> HookResult | None:
        if not 200 <= response.status < 300 or "json" not in response.headers.get("content-type", ""):
            return None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if any(self.regex.search(text) for text in answer_texts(parsed)):
            ctx.log.info("answer blocked")
            return self._blocked()
        return None

    async def on_stream_event(self, event: StreamEvent, ctx: HookContext) -> HookResult | None:
        found = delta_text(event.json())
        if found is None:
            return None
        index, text = found
        tails: dict[int, str] = ctx.state.setdefault("tails", {})
        seen = tails.get(index, "") + text
        if self.regex.search(seen):
            ctx.log.info("streamed answer blocked")
            return self._blocked()
        tails[index] = seen[-self.window_chars:]
        return None
