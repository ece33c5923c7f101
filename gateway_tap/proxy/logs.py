"""Structured logs: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from schemas.wire import TRUNCATED, valid_text

LOG_VALUE_CHARS = 2048
"""A string field of a log line longer than this is clipped (the tap's own fields are bounded before; this is the
net for any other)."""
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra fields}``; extras come from ``extra=`` or a LoggerAdapter."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                data[key] = value if type(value) is not str or len(value) <= LOG_VALUE_CHARS else \
                    value[:LOG_VALUE_CHARS] + TRUNCATED
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(data, default=str).decode()
        except TypeError:  # text that is not valid Unicode (an undecodable byte a client sent): escaped, not lost
            return orjson.dumps({k: valid_text(v) if type(v) is str else v for k, v in data.items()},
                                default=lambda v: valid_text(str(v))).decode()


def configure_logging(level: str = "info") -> None:
    """Route the root logger to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, JsonFormatter):
            root.setLevel(level.upper())
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


access_log = logging.getLogger("gateway_tap.access")
