"""W3C trace context (``traceparent``/``tracestate``): every request is one span of the caller's trace.

A request that arrives with a valid ``traceparent`` continues that trace: the tap's span gets a new
span id, its parent is the caller's span. Without one (or with one that is not valid, which the
W3C recommendation says to ignore) the tap starts a trace. The tap sends its span's ``traceparent``
upstream and back to the client, passes ``tracestate`` through untouched, shows ``trace_id`` to
hooks and records ``trace_id``, ``span_id`` and ``parent_span_id`` in every event, so analytics can
join gateway events with the application's traces.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# version 00 is exactly this; a later version starts with it and may add "-..." (read as 00, per the spec).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = "01"  # a trace the tap starts is recorded: every request becomes events


class TraceContext(NamedTuple):
    """The tap's span of one request: ``trace_id`` (32 hex), ``span_id`` (16 hex), the caller's span, flags."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    flags: str

    @property
    def traceparent(self) -> str:
        """This span as a ``traceparent`` header value (sent upstream and back to the client)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def _new_span_id() -> str:
    while (bits := random.getrandbits(64)) == 0:  # pragma: no cover - one chance in 2**64
        pass
    return f"{bits:016x}"


def start_trace() -> TraceContext:
    """A new trace whose root span is the tap's."""
    while (bits := random.getrandbits(128)) == 0:  # pragma: no cover
        pass
    return TraceContext(f"{bits:032x}", _new_span_id(), None, _SAMPLED)


def continue_trace(traceparent: str | None) -> TraceContext:
    """The tap's span in the trace ``traceparent`` names, or a new trace when it is absent or not valid."""
    if not traceparent:
        return start_trace()
    found = _TRACEPARENT.fullmatch(traceparent.strip())
    if found is None:
        return start_trace()
    version, trace_id, parent, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return start_trace()
    return TraceContext(trace_id, _new_span_id(), parent, flags)
