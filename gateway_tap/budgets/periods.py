"""Budget periods (UTC) and the one money rounding rule."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta

from gateway_tap.settings import Period

Clock = Callable[[], datetime]
"""Returns the current aware UTC datetime; injected in tests."""

MICROS_PER_USD = 1_000_000


def utc_clock() -> datetime:
    return datetime.now(UTC)


_MICROS: dict[float, int] = {}
_MICROS_MAX = 4096


def usd_to_micros(usd: float) -> int:
    """Integer micro-USD for a cost: the float's shortest decimal repr, rounded half up (away from zero).

    Every sum of money in the store and the enforcer is a sum of these integers, so it is exact.
    Integer arithmetic on the digits of ``repr``: the same result as ``Decimal(repr(usd))`` scaled and
    quantized with ``ROUND_HALF_UP`` (a test compares both). Costs repeat (same model, same token
    counts), so results are memoized in a bounded table.
    """
    micros = _MICROS.get(usd)
    if micros is None:
        micros = _usd_to_micros(usd)
        if len(_MICROS) >= _MICROS_MAX:
            _MICROS.clear()
        _MICROS[usd] = micros
    return micros


def _usd_to_micros(usd: float) -> int:
    text = repr(float(usd))
    mantissa, _, exponent = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    negative = whole.startswith("-")
    digits = int((whole.lstrip("-") + fraction) or "0")  # raises ValueError on inf/nan, as Decimal's quantize does
    shift = 6 + (int(exponent) if exponent else 0) - len(fraction)  # value in micros = digits * 10**shift
    micros: int
    if shift >= 0:
        micros = digits * 10**shift
    else:
        unit: int = 10**-shift
        micros, rest = divmod(digits, unit)
        if 2 * rest >= unit:
            micros += 1
    return -micros if negative else micros


def micros_to_usd(micros: int) -> float:
    return micros / MICROS_PER_USD


def period_start(period: Period, now: datetime | date) -> date:
    """First UTC day of the period containing ``now``."""
    day = _utc_day(now)
    return day.replace(day=1) if period == "monthly" else day


def period_end(period: Period, start: date) -> date:
    """First UTC day after the period starting at ``start`` (exclusive end)."""
    if period == "daily":
        return start + timedelta(days=1)
    return date(start.year + 1, 1, 1) if start.month == 12 else date(start.year, start.month + 1, 1)


def resets_at(period: Period, now: datetime) -> datetime:
    """When the period containing ``now`` ends (UTC midnight)."""
    return datetime.combine(period_end(period, period_start(period, now)), time(0), tzinfo=UTC)


def usage_day(period: Period, start: date, emitted_at: datetime) -> date:
    """The UTC day a usage event is counted on.

    The emission day, kept inside the period the tap counted the call against
    (a call admitted on Jan 31 and finished on Feb 1 still counts for January).
    Days are the store's unit, so both daily and monthly budgets read the same totals.
    """
    day = _utc_day(emitted_at)
    end = period_end(period, start)
    if day < start:
        return start
    if day >= end:
        return end - timedelta(days=1)
    return day


def _utc_day(value: datetime | date) -> date:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.date()
    return value
