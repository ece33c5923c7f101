"""Bound prometheus-client children, observed without the per-call checks: for metrics on every request.

``Histogram.observe`` checks the child is observable and walks the bucket bounds in Python;
:class:`FastHistogram` finds the bucket by bisection and increments prometheus-client's own value
objects (a locked float, or the mmap'd file in multiprocess mode) directly, with the same result
(``tests/proxy/test_tap_metrics.py`` compares both). Bind once (``labels(...)``), observe often.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client import Counter, Histogram


class FastHistogram:
    """A bound histogram child's values, observed by bisection."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        internals: Any = child
        self._bounds: list[float] = list(internals._upper_bounds)
        self._buckets: list[Any] = internals._buckets
        self._sum: Any = internals._sum

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1)


class FastCounter:
    """A bound counter child's value, incremented without the per-call checks (amounts are never negative)."""

    __slots__ = ("_value",)

    def __init__(self, child: Counter) -> None:
        internals: Any = child
        self._value: Any = internals._value

    def inc(self, amount: float = 1) -> None:
        self._value.inc(amount)
