"""The ``make_up`` fixture: ``gateway-tap up`` subprocesses that are always cleaned up."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.up import Up


@pytest.fixture
def make_up() -> Iterator[type[Up]]:
    """``make_up(state_dir, ports, ...).start()``; every ``up`` started is SIGKILLed with its descendants after
    the test if it is still running."""
    started: list[Up] = []

    class _Up(Up):
        def start(self) -> Up:
            started.append(self)
            return super().start()

    yield _Up
    for up in reversed(started):
        up.cleanup()
