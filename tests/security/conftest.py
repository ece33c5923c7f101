"""Fixtures of the security tests: an upstream of the tests' own that misbehaves on request and records what it
received (``tests/support/hostile_upstream.py``), one per test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.hostile_upstream import HostileUpstream


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[HostileUpstream]:
    async with HostileUpstream() as up:
        yield up
