"""A response that aiohttp began to prepare but that never went out, so that another can take its place.

``StreamResponse.prepare`` sets the connection's writer up for the response (chunked framing for a stream,
compression) before its ``on_response_prepare`` signal and before it writes the headers. When either refuses the
response (a header aiohttp will not send, a plugin endpoint that started its stream past its timeout), nothing went
out, but the writer is still set up for it: the JSON answer sent instead (with its ``Content-Length``) must not
inherit that framing.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http import StreamWriter


def forget_unsent(request: web.BaseRequest) -> None:
    """Undo what preparing a response that did not go out set on ``request``'s connection writer."""
    writer = request.writer
    if isinstance(writer, StreamWriter):
        writer.chunked = False
        writer._compress = None  # aiohttp has no public way to turn compression off again
