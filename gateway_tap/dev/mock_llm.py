"""A deterministic mock LLM upstream for tests, benchmarks and the local stack.

Speaks enough of the OpenAI API (``/v1/chat/completions``, ``/v1/embeddings``,
``/v1/models``) and the Anthropic API (``/v1/messages``) for the official SDKs,
non-streaming and SSE streaming.

Usage numbers are a pure function of the request, so tests can compute the
expected cost: ``prompt_tokens`` = total characters of the message contents // 4
(at least 1), ``completion_tokens`` = ``max_tokens`` (or ``max_completion_tokens``)
when given, else 16. The reply text is ``completion_tokens`` words ``"tok"``.

Fault injection, per request through headers (or for every request through CLI
options): ``x-mock-latency-ms`` (delay before the first byte),
``x-mock-status`` (answer with that HTTP status and an error body),
``x-mock-no-usage: 1`` (omit usage, so the tap must estimate),
``x-mock-chunk-delay-ms`` (delay between streamed chunks),
``x-mock-reply`` (words to answer with instead of ``"tok"``, cycled; usage is unchanged),
``x-mock-split-events: 1`` (write each streamed event in two halves, apart in time, so a
reader sees it cut across two socket reads).

Cache and reasoning tokens, per request through headers (the usage numbers above stay the totals):
``x-mock-cache-read-tokens: N`` and ``x-mock-cache-write-tokens: N`` (of the prompt tokens: OpenAI reports
the reads as ``prompt_tokens_details.cached_tokens`` and the writes as ``cache_write_tokens`` inside
``prompt_tokens``; Anthropic reports them as ``cache_read_input_tokens`` / ``cache_creation_input_tokens``
beside ``input_tokens``, which then counts only the rest), ``x-mock-reasoning-tokens: N`` (of the completion
tokens: OpenAI ``completion_tokens_details.reasoning_tokens``, Anthropic
``output_tokens_details.thinking_tokens``). Each is capped by its total.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

DEFAULT_COMPLETION_TOKENS = 16


@dataclass
class MockOptions:
    """Defaults applied to every request; headers override them per request."""

    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    error_rate: float = 0.0  # fraction of requests answered with ``error_status``
    error_status: int = 500


def _content_chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    return 0


def prompt_tokens_for(body: dict[str, Any]) -> int:
    """Deterministic prompt token count for a chat/messages request body."""
    chars = sum(_content_chars(m.get("content")) for m in body.get("messages", []) if isinstance(m, dict))
    system = body.get("system")
    if system is not None:
        chars += _content_chars(system)
    return max(1, chars // 4)


def completion_tokens_for(body: dict[str, Any]) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS
    return max(1, int(value))


def _token_classes(request: web.Request, prompt: int, completion: int) -> tuple[int, int, int]:
    """``(cache_read, cache_write, reasoning)`` tokens the request's headers ask for, capped by the totals."""
    def header(name: str) -> int:
        try:
            return max(0, int(request.headers.get(name, 0)))
        except ValueError:
            return 0

    read = min(header("x-mock-cache-read-tokens"), prompt)
    write = min(header("x-mock-cache-write-tokens"), prompt - read)
    return read, write, min(header("x-mock-reasoning-tokens"), completion)


def _openai_usage(request: web.Request, prompt: int, completion: int) -> dict[str, Any]:
    read, write, reasoning = _token_classes(request, prompt, completion)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if read or write:
        usage["prompt_tokens_details"] = {"cached_tokens": read, "cache_write_tokens": write}
    if reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _anthropic_usage(request: web.Request, prompt: int, completion: int) -> dict[str, Any]:
    read, write, reasoning = _token_classes(request, prompt, completion)
    usage: dict[str, Any] = {"input_tokens": prompt - read - write, "output_tokens": completion}
    if read or write:
        usage["cache_read_input_tokens"] = read
        usage["cache_creation_input_tokens"] = write
    if reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": reasoning}
    return usage


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class MockLLM:
    def __init__(self, options: MockOptions | None = None) -> None:
        self.options = options or MockOptions()
        self.requests = 0
        self.last_headers: dict[str, str] = {}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/_mock/stats", self.stats)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        return _json({"requests": self.requests, "last_headers": self.last_headers})

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "mock"}
            for name in ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
        ]})

    async def _prelude(self, request: web.Request, vendor: str) -> tuple[dict[str, Any], web.Response | None]:
        """Count, record headers, parse JSON, apply injected latency and errors."""
        self.requests += 1
        self.last_headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return {}, _error(vendor, 400, "invalid_request_error", "body is not valid JSON")
        if not isinstance(body, dict):
            return {}, _error(vendor, 400, "invalid_request_error", "body must be a JSON object")
        latency = float(request.headers.get("x-mock-latency-ms", self.options.latency_ms))
        if latency > 0:
            await asyncio.sleep(latency / 1000)
        status = int(request.headers.get("x-mock-status", 0))
        # Deterministic spread of injected errors: the same request sequence fails the same way every run.
        spread = self.requests * 7919 % 1000
        if not status and self.options.error_rate > 0 and spread < self.options.error_rate * 1000:
            status = self.options.error_status
        if status >= 400:
            kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
            return body, _error(vendor, status, kind, f"mock upstream injected status {status}")
        return body, None

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prelude(request, "openai")
        if failure is not None:
            return failure
        model = str(body.get("model", "gpt-4o-mini"))
        prompt = prompt_tokens_for(body)
        completion = completion_tokens_for(body)
        n = int(body.get("n") or 1)
        no_usage = request.headers.get("x-mock-no-usage") == "1"
        created = int(time.time())
        cid = f"chatcmpl-mock{self.requests}"
        usage = _openai_usage(request, prompt, completion * n)
        words = _words(request, completion)
        if not body.get("stream"):
            text = " ".join(words)
            payload: dict[str, Any] = {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop", "logprobs": None} for i in range(n)],
            }
            if not no_usage:
                payload["usage"] = usage
            return _json(payload)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and not no_usage
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        delay = float(request.headers.get("x-mock-chunk-delay-ms", self.options.chunk_delay_ms)) / 1000

        def chunk(delta: dict[str, Any], finish: str | None, index: int = 0) -> bytes:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                data["usage"] = None
            return b"data: " + orjson.dumps(data) + b"\n\n"

        write = _writer(request, resp)
        for i in range(n):
            await write(chunk({"role": "assistant", "content": ""}, None, i))
            for word in words:
                if delay:
                    await asyncio.sleep(delay)
                await write(chunk({"content": word + " "}, None, i))
            await write(chunk({}, "stop", i))
        if include_usage:
            final = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [], "usage": usage}
            await write(b"data: " + orjson.dumps(final) + b"\n\n")
        await write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body, failure = await self._prelude(request, "openai")
        if failure is not None:
            return failure
        inputs = body.get("input", "")
        items = inputs if isinstance(inputs, list) else [inputs]
        tokens = max(1, sum(len(str(x)) for x in items) // 4)
        return _json({
            "object": "list", "model": body.get("model", "text-embedding-3-small"),
            "data": [{"object": "embedding", "index": i, "embedding": [0.0, 0.1, 0.2, 0.3]}
                     for i in range(len(items))],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API: a whole response, or its typed events with ``usage`` in ``response.completed``."""
        body, failure = await self._prelude(request, "openai")
        if failure is not None:
            return failure
        model = str(body.get("model", "gpt-4o-mini"))
        given = body.get("input", "")
        prompt = prompt_tokens_for({"messages": given if isinstance(given, list) else [{"content": given}],
                                    "system": body.get("instructions")})
        completion = max(1, int(body.get("max_output_tokens") or DEFAULT_COMPLETION_TOKENS))
        read, _, reasoning = _token_classes(request, prompt, completion)
        rid = f"resp_mock{self.requests}"
        words = _words(request, completion)
        response: dict[str, Any] = {
            "id": rid, "object": "response", "created_at": int(time.time()), "status": "completed", "model": model,
            "error": None, "incomplete_details": None, "instructions": body.get("instructions"), "metadata": {},
            "parallel_tool_calls": True, "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "output": [{"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": " ".join(words), "annotations": []}]}],
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": read},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
                      "total_tokens": prompt + completion}}
        if not body.get("stream"):
            return _json(response)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        delay = float(request.headers.get("x-mock-chunk-delay-ms", self.options.chunk_delay_ms)) / 1000
        write = _writer(request, resp)
        sequence = 0

        async def send(event: str, data: dict[str, Any]) -> None:
            nonlocal sequence
            data = {"type": event, "sequence_number": sequence, **data}
            sequence += 1
            await write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

        await send("response.created", {"response": {**response, "status": "in_progress", "output": [],
                                                     "usage": None}})
        for word in words:
            if delay:
                await asyncio.sleep(delay)
            await send("response.output_text.delta", {"item_id": f"msg_{rid}", "output_index": 0,
                                                      "content_index": 0, "delta": word + " "})
        await send("response.completed", {"response": response})
        await resp.write_eof()
        return resp

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._prelude(request, "anthropic")
        if failure is not None:
            return failure
        model = str(body.get("model", "claude-haiku-4-5"))
        prompt = prompt_tokens_for(body)
        completion = completion_tokens_for(body)
        mid = f"msg_mock{self.requests}"
        words = _words(request, completion)
        text = " ".join(words)
        if not body.get("stream"):
            return _json({
                "id": mid, "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": _anthropic_usage(request, prompt, completion),
            })
        resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
        await resp.prepare(request)
        delay = float(request.headers.get("x-mock-chunk-delay-ms", self.options.chunk_delay_ms)) / 1000

        write = _writer(request, resp)

        async def send(event: str, data: dict[str, Any]) -> None:
            await write(b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n")

        usage = _anthropic_usage(request, prompt, completion)
        await send("message_start", {"type": "message_start", "message": {
            "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}})
        await send("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        for word in words:
            if delay:
                await asyncio.sleep(delay)
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": word + " "}})
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        final = {"output_tokens": completion}
        if "output_tokens_details" in usage:
            final["output_tokens_details"] = usage["output_tokens_details"]
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": final})
        await send("message_stop", {"type": "message_stop"})
        await resp.write_eof()
        return resp


def _words(request: web.Request, count: int) -> list[str]:
    """The reply's words: ``x-mock-reply`` cycled to ``count`` words, else ``"tok"``."""
    reply = request.headers.get("x-mock-reply", "").split()
    return [reply[i % len(reply)] for i in range(count)] if reply else ["tok"] * count


def _writer(request: web.Request, resp: web.StreamResponse) -> Any:
    """``resp.write``, or with ``x-mock-split-events: 1`` a write in two halves 5 ms apart."""
    if request.headers.get("x-mock-split-events") != "1":
        return resp.write

    async def split(data: bytes) -> None:
        half = len(data) // 2
        await resp.write(data[:half])
        await asyncio.sleep(0.005)
        await resp.write(data[half:])

    return split


def _error(vendor: str, status: int, kind: str, message: str) -> web.Response:
    if vendor == "anthropic":
        return _json({"type": "error", "error": {"type": kind, "message": message}}, status)
    return _json({"error": {"type": kind, "code": str(status), "message": message, "param": None}}, status)


def run(host: str = "127.0.0.1", port: int = 8090, options: MockOptions | None = None) -> None:
    """Serve the mock in the foreground until interrupted."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        pass
    web.run_app(MockLLM(options).app(), host=host, port=port, print=None, access_log=None)
