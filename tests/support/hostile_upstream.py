"""A misbehaving LLM upstream of the tests' own, and a raw HTTP client that sends a request target as written.

:class:`HostileUpstream` is an aiohttp server on a free port, in the test's event loop. It records every
request as it arrived (the request target exactly as on the wire, headers, body) and answers as the request's
``x-hostile`` header says (the tap forwards that header untouched):

========================  =====================================================================================
(absent)                  an OpenAI chat completion with a sane ``usage``
``usage:<json>``          that chat completion with ``usage`` replaced by ``<json>`` (written as is: ``NaN`` too)
``usage-sse:<json>``      an OpenAI stream (two content events) whose final usage chunk carries ``<json>``
``big:<n>``               a non-streamed JSON body of ``n`` bytes, with its Content-Length
``endless``               a non-streamed (chunked) body that never ends
``endless-sse``           an event stream whose events never end
``endless-event``         an event stream with one event that never ends (no blank line, ever)
``gzip-bomb:<n>``         ``n`` zero bytes, gzip-compressed (about ``n / 1000`` bytes on the wire)
``deflate-bomb:<n>``      the same as zlib ``deflate``
``gzip-endless``          an endless gzip-compressed body (compressed zeros, never finished)
``gzip-endless-sse``      an endless gzip-compressed event stream
``br``                    a body declared ``content-encoding: br``
========================  =====================================================================================
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from gateway_tap.dev.servers import free_port

CHUNK = 64 * 1024
_SSE_EVENT = b'data: {"id":"c","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"' + b"x" * 900 \
    + b'"}}]}\n\n'
CHAT_USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@dataclass
class Received:
    """One request as the upstream got it."""

    method: str
    target: str
    """The request target as on the wire: path and query, no decoding or normalisation."""
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes


def chat_body(usage: bytes | None = None, content: str = "hello from upstream") -> bytes:
    """An OpenAI chat completion; ``usage`` is spliced in raw (may be invalid JSON on purpose)."""
    head = orjson.dumps({"id": "chatcmpl-hostile", "object": "chat.completion", "model": "gpt-4o-mini",
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})
    return head[:-1] + b',"usage":' + (usage if usage is not None else orjson.dumps(CHAT_USAGE)) + b"}"


def _compressor(wbits: int) -> Any:
    return zlib.compressobj(9, zlib.DEFLATED, wbits)


@lru_cache(maxsize=8)
def bomb(size: int, wbits: int = 31) -> bytes:
    """``size`` zero bytes compressed (gzip for ``wbits`` 31, zlib deflate for 15), built without holding them."""
    comp = _compressor(wbits)
    zeros = bytes(1024 * 1024)
    parts = [comp.compress(zeros) for _ in range(size // len(zeros))]
    parts.append(comp.compress(bytes(size % len(zeros))))
    parts.append(comp.flush())
    return b"".join(parts)


@dataclass
class HostileUpstream:
    """See the module. ``url`` is its base URL; ``received`` every request so far, in arrival order."""

    received: list[Received] = field(default_factory=list)
    url: str = ""
    active: int = 0
    """Requests being answered right now: an endless answer ends only when the tap hangs up."""
    _runner: web.AppRunner | None = None
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> HostileUpstream:
        self._idle.set()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def for_request(self, request_id: str) -> list[Received]:
        """What arrived for the tap's request ``request_id`` (the tap sends it as ``x-request-id``)."""
        return [r for r in self.received if r.headers.get("x-request-id") == request_id]

    async def idle(self, timeout_s: float = 10.0) -> None:
        """Return once no request is being answered (the tap hung up on every endless answer)."""
        async with asyncio.timeout(timeout_s):
            await self._idle.wait()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self._idle.clear()
        try:
            return await self._answer(request)
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.method, request.raw_path, request.rel_url.raw_path,
                                      request.rel_url.raw_query_string, request.headers, body))
        kind, _, arg = request.headers.get("x-hostile", "").partition(":")
        if kind == "usage":
            return web.Response(body=chat_body(arg.encode()), content_type="application/json")
        if kind == "usage-sse":
            return await self._usage_stream(request, arg.encode())
        if kind == "big":
            return await self._big(request, int(arg))
        if kind in ("endless", "endless-sse", "endless-event"):
            return await self._endless(request, kind)
        if kind in ("gzip-bomb", "deflate-bomb"):
            compressed = bomb(int(arg), 31 if kind == "gzip-bomb" else 15)
            return await self._send(request, _pieces(compressed), "application/json", kind.split("-")[0])
        if kind in ("gzip-endless", "gzip-endless-sse"):
            content_type = "text/event-stream" if kind.endswith("sse") else "application/json"
            return await self._send(request, _endless_gzip(kind.endswith("sse")), content_type, "gzip")
        if kind == "br":
            return web.Response(body=b"\x1b\xff\xff" * 1000, content_type="application/json",
                                headers={"content-encoding": "br"})
        return web.Response(body=chat_body(), content_type="application/json")

    @staticmethod
    async def _send(request: web.Request, pieces: AsyncIterator[bytes], content_type: str,
                    encoding: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers=CIMultiDict({"content-type": content_type, "content-encoding": encoding}))
        await resp.prepare(request)
        try:
            async for piece in pieces:
                await resp.write(piece)
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the tap hung up on us, as it should
        return resp

    @staticmethod
    async def _big(request: web.Request, size: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/json"})
        resp.content_length = size
        await resp.prepare(request)
        try:
            await resp.write(b'{"pad":"')
            left = size - 10
            while left > 0:
                await resp.write(b"a" * min(CHUNK, left))
                left -= CHUNK
            await resp.write(b'"}')
            await resp.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    @staticmethod
    async def _endless(request: web.Request, kind: str) -> web.StreamResponse:
        sse = kind != "endless"
        resp = web.StreamResponse(headers={"content-type": "text/event-stream" if sse else "application/json"})
        await resp.prepare(request)
        if kind == "endless-sse":
            piece = _SSE_EVENT * (CHUNK // len(_SSE_EVENT))
        elif kind == "endless-event":
            piece = b"data: " + b"x" * (CHUNK - 6)
        else:
            piece = b"a" * CHUNK
        try:
            if kind == "endless-event":
                await resp.write(piece)
                piece = b"x" * CHUNK
            while True:
                await resp.write(piece)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    @staticmethod
    async def _usage_stream(request: web.Request, usage: bytes) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("hello", " there"):
            await resp.write(b'data: {"id":"c","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"'
                             + text.encode() + b'"}}]}\n\n')
        await resp.write(b'data: {"id":"c","model":"gpt-4o-mini","choices":[],"usage":' + usage + b"}\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _pieces(data: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


async def _endless_gzip(sse: bool) -> AsyncIterator[bytes]:
    # After a full flush the compressor starts afresh, so the same input compresses to the same bytes: compress
    # one block (twice: the first carries the gzip header), then send the second for ever, at no CPU cost.
    comp = _compressor(31)
    plain = _SSE_EVENT * (1024 * 1024 // len(_SSE_EVENT)) if sse else bytes(1024 * 1024)
    first = comp.compress(plain) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(plain) + comp.flush(zlib.Z_FULL_FLUSH)
    yield first
    while True:
        yield again


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


async def raw_request(base_url: str, target: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                      body: bytes = b"", timeout_s: float = 30.0) -> RawResponse:
    """Send one request with ``target`` exactly as written (``curl --path-as-is``) on a new connection; read the
    answer until the server closes (``Connection: close``). Only for answers with a Content-Length or none."""
    host, port = base_url.removeprefix("http://").split(":")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            data = await reader.read(-1)
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed.add(name.strip(), value.strip())
    if parsed.get("transfer-encoding", "").lower() == "chunked":
        payload = _unchunk(payload)
    return RawResponse(int(status_line.split()[1]), parsed, payload)


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)
