"""Retries, owned by the runtime: sinks classify failures, this module decides what follows.

A sink says *what* went wrong (:class:`~collectors.sdk.RetryLater`, possibly per event with
``pending``; :class:`~collectors.sdk.BadEvent` / :class:`~collectors.sdk.BadEvents`; a
:class:`~collectors.sdk.CollectorError` whose ``retriable`` is False); the runtime decides *when*
to try again, with one set of settings per collector (``collectors.<NAME>.retry``): exponential
backoff with full jitter, the sink's ``retry_after`` as a floor, retried until it works or the
process stops. Nothing retriable is ever dead-lettered or skipped.
"""

from __future__ import annotations

import random

from collectors.sdk import CollectorError, RetryLater
from gateway_tap.settings import RetrySettings


def backoff_delay(attempt: int, initial: float, maximum: float, retry_after: float | None = None) -> float:
    """Exponential backoff with full jitter; a collector's ``retry_after`` hint is a lower bound."""
    delay = random.uniform(0, min(maximum, initial * 2 ** (attempt - 1)))
    return max(delay, min(retry_after, maximum)) if retry_after else delay


def retriable(exc: BaseException) -> bool:
    """Whether the runtime retries after ``exc``: a CollectorError says so itself; anything else is retried."""
    return exc.retriable if isinstance(exc, CollectorError) else True


def retry_delay_s(exc: BaseException, attempt: int, settings: RetrySettings) -> float:
    """How long to wait before attempt ``attempt + 1`` after ``exc`` (``attempt`` counts from 1)."""
    hint = exc.retry_after if isinstance(exc, RetryLater) else None
    return backoff_delay(attempt, settings.initial_backoff_ms / 1000, settings.max_backoff_ms / 1000, hint)
