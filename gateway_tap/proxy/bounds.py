"""How long a client-controlled string may be once it reaches an event or a log line.

A client decides the length of its model name, user agent, path, header names and values, and (through plugins)
metadata values and user ids. Unbounded, one request could write a 2 MB log line or an event larger than the
publisher sends (so it would be dropped): every such string is clipped to its bound here, with
:data:`TRUNCATED` appended so a reader sees it was cut. The bounds are in characters and listed in
docs/security.md. :func:`schemas.wire.encode_wire` is the last net behind them (undecodable text, an event
still too large), so no field can make an event unpublishable.
"""

from __future__ import annotations

from typing import overload

from schemas.wire import TRUNCATED  # appended to a clipped string, and to a captured body cut at its limit

METHOD_CHARS = 32
PATH_CHARS = 2048
ID_CHARS = 256
"""``llm_id`` (a path segment), ``app_id`` and ``user_id`` (auth plugins may take them from a token), plugin names."""
MODEL_CHARS = 256
USER_AGENT_CHARS = 512
HEADER_NAME_CHARS = 128
HEADER_VALUE_CHARS = 512
HEADERS_MAX = 64
"""Headers kept per side (request, response); the rest are left out."""
METADATA_KEY_CHARS = 128
METADATA_VALUE_CHARS = 1024
METADATA_MAX = 64
"""Metadata entries kept (``metadata`` of proxy_log, ``tags`` of analytics); the rest are left out."""
ERROR_MESSAGE_CHARS = 1024
ERROR_CODE_CHARS = 128
"""``error.type`` and ``error.code`` (a plugin's stop sets them)."""


@overload
def clip(value: str, limit: int) -> str: ...


@overload
def clip(value: str | None, limit: int) -> str | None: ...


def clip(value: str | None, limit: int) -> str | None:
    """``value`` cut to ``limit`` characters, followed by :data:`TRUNCATED` when it was longer."""
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + TRUNCATED


def clip_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Metadata with at most :data:`METADATA_MAX` entries, keys and values clipped; values made strings (a plugin
    may have put another type in). Returned as it is when nothing needs changing (the common case)."""
    if len(metadata) <= METADATA_MAX:
        for key, value in metadata.items():
            if type(value) is not str or len(value) > METADATA_VALUE_CHARS or len(key) > METADATA_KEY_CHARS:
                break
        else:
            return metadata
    out: dict[str, str] = {}
    for key, value in metadata.items():
        out[clip(str(key), METADATA_KEY_CHARS)] = clip(value if type(value) is str else str(value),
                                                         METADATA_VALUE_CHARS)
        if len(out) >= METADATA_MAX:
            break
    return out
