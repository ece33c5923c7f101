"""Rate limits: requests and tokens per minute and requests in flight, per app, key and app x LLM / model.

:mod:`.limiter` holds the rule and the per-worker limiter, :mod:`.shared` the Redis one; the tap's
built-in step is :mod:`gateway_tap.proxy.ratelimit`.
"""

from gateway_tap.ratelimits.limiter import (
    Admission,
    Counter,
    CounterState,
    Decision,
    Limits,
    LocalLimiter,
    Plan,
    RateLimiter,
    format_duration,
)
from gateway_tap.ratelimits.shared import SharedLimiter

__all__ = ["Admission", "Counter", "CounterState", "Decision", "Limits", "LocalLimiter", "Plan", "RateLimiter",
           "SharedLimiter", "format_duration"]
