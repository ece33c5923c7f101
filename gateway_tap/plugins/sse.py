"""Server-sent events on the wire: an incremental reader (bytes -> :class:`StreamEvent`) and error events.

The reader splits at blank lines (``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``), so an event cut across
two reads of the socket is seen whole, once. Each event keeps the exact bytes it arrived as, so an
event no hook changed is forwarded untouched. Blocks without data (comments, keep-alives) are not
events: they come back as bytes, to be forwarded as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import orjson

from gateway_tap.hooks import StreamEvent
from gateway_tap.plugins.chain import RequestScope, Step, Stopped, run_event_hooks

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


class EventReader:
    """Feed it the body as it arrives; it returns each complete event (or non-event block) once."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[StreamEvent | bytes]:
        data = self._buffer + chunk if self._buffer else chunk
        out: list[StreamEvent | bytes] = []
        start = 0
        for match in _BOUNDARY.finditer(data):
            out.append(parse_block(data[start:match.end()]))
            start = match.end()
        self._buffer = data[start:]
        return out

    @property
    def pending_bytes(self) -> int:
        """The bytes of an event not complete yet, held until its end."""
        return len(self._buffer)

    def flush(self) -> list[StreamEvent | bytes]:
        """What is left when the body ends: an unterminated last event, if any."""
        rest, self._buffer = self._buffer, b""
        return [parse_block(rest)] if rest else []


def parse_block(block: bytes) -> StreamEvent | bytes:
    """One event block (with its terminating blank line) as an event, or the block itself when it has no data."""
    data: list[bytes] = []
    event: str | None = None
    event_id: str | None = None
    for line in _LINE.split(block):
        if not line or line[0] == 58:  # b":" starts a comment
            continue
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
        elif name == b"id":
            event_id = value.decode("utf-8", "replace")
    if not data:
        return block
    return StreamEvent(b"\n".join(data).decode("utf-8", "replace"), event, event_id, raw=block)


def error_event(vendor: str, type_: str, code: str, message: str, request_id: str) -> StreamEvent:
    """The event that ends a stream with an error, in the vendor's own format.

    OpenAI: a ``data:`` chunk whose JSON has an ``error`` object (the ``openai`` SDK raises ``APIError``).
    Anthropic: ``event: error`` with ``{"type": "error", "error": {...}}`` (the ``anthropic`` SDK raises it).
    """
    if vendor == "anthropic":
        payload = {"type": "error", "error": {"type": type_, "code": code, "message": message,
                                              "request_id": request_id}}
        return StreamEvent(orjson.dumps(payload).decode(), "error")
    payload = {"error": {"type": type_, "code": code, "message": message, "request_id": request_id}}
    return StreamEvent(orjson.dumps(payload).decode())


class EventRelay:
    """A streamed answer under stream event hooks: parse the events once, let ``account`` see each as the
    upstream sent it (False: withhold it from the client), run the hooks, re-encode what they let through.

    A hook's stop ends the stream: the error event goes out, ``stopped`` holds the stop, and the caller
    stops reading the upstream. ``delivered`` counts the events the client got.
    """

    __slots__ = ("_account", "_reader", "_scope", "_steps", "_vendor", "delivered", "stopped")

    def __init__(self, steps: Sequence[Step], vendor: str, scope: RequestScope,
                 account: Callable[[StreamEvent], bool] | None = None) -> None:
        self._steps = steps
        self._vendor = vendor
        self._scope = scope
        self._account = account
        self._reader = EventReader()
        self.delivered = 0
        self.stopped: Stopped | None = None

    async def feed(self, chunk: bytes) -> bytes:
        """The bytes to send for this chunk of the upstream's body (maybe none yet)."""
        return await self._relay(self._reader.feed(chunk))

    @property
    def pending_bytes(self) -> int:
        """The bytes of an event not complete yet (the reader holds them until its end)."""
        return self._reader.pending_bytes

    async def flush(self) -> bytes:
        """The bytes to send once the upstream's body ended."""
        return await self._relay(self._reader.flush())

    async def _relay(self, items: list[StreamEvent | bytes]) -> bytes:
        out: list[bytes] = []
        for item in items:
            if self.stopped is not None:
                break
            if isinstance(item, bytes):  # a comment or keep-alive, not an event
                out.append(item)
                continue
            if self._account is not None and not self._account(item):
                continue
            try:
                event = await run_event_hooks(self._steps, item, self._scope)
            except Stopped as stop:
                self.stopped = stop
                out.append(error_event(self._vendor, stop.error_type, stop.code, stop.message,
                                       self._scope.request_id).encode())
                break
            if event is not None:
                self.delivered += 1
                out.append(event.encode())
        return b"".join(out)
