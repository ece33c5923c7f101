"""Unit tests of the collector runtime's retry delay (exponential backoff, full jitter, retry_after floor)."""

from __future__ import annotations

import random

import pytest

from collectors.delivery import backoff_delay


@pytest.fixture
def jitter_bounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float]]:
    """Make the jitter return its upper bound, and record the bounds it was asked for."""
    asked: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        asked.append((low, high))
        return high

    monkeypatch.setattr(random, "uniform", uniform)
    return asked


def test_the_ceiling_doubles_per_attempt_up_to_the_maximum(jitter_bounds: list[tuple[float, float]]) -> None:
    delays = [backoff_delay(attempt, initial=0.1, maximum=1.0) for attempt in range(1, 7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    assert jitter_bounds == pytest.approx([(0, 0.1), (0, 0.2), (0, 0.4), (0, 0.8), (0, 1.0), (0, 1.0)])


def test_retry_after_is_a_floor_capped_at_the_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: low)  # the shortest jittered delay
    assert backoff_delay(1, initial=0.1, maximum=5.0) == 0
    assert backoff_delay(1, initial=0.1, maximum=5.0, retry_after=2.0) == 2.0
    assert backoff_delay(3, initial=0.1, maximum=5.0, retry_after=60.0) == 5.0
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    assert backoff_delay(4, initial=1.0, maximum=30.0, retry_after=2.0) == 8.0  # the jitter above the floor wins


def test_real_jitter_stays_within_its_bounds() -> None:
    delays = [backoff_delay(3, initial=0.5, maximum=10.0) for _ in range(500)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 400  # jittered, not a constant
