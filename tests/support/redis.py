"""Redis for the tests (a pytest plugin of tests/conftest.py): Debian's ``redis-server`` on a free port.

``redis_server`` is one server for the session (tests keep apart by key prefix); ``own_redis`` is a
server of the test's own, for tests that stop and restart it. ``GATEWAY_TAP_TEST_REDIS`` (a URL) points
the session fixture at an external server instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_tap.dev.servers import RedisServer


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis."""
    external = os.environ.get("GATEWAY_TAP_TEST_REDIS")
    if external:
        yield external
        return
    data_dir: Path = tmp_path_factory.mktemp("redis")
    server = RedisServer(data_dir=data_dir, log_path=data_dir / "redis.log")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (started; stopped at the end), which the test may stop and restart."""
    server = RedisServer(data_dir=tmp_path / "redis", log_path=tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to one test."""
    return f"t{uuid.uuid4().hex[:10]}:"
