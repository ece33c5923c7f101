"""Session-scoped real servers for the suite.

Kafka and Elasticsearch come from one noida-db process on free ports unless
``GATEWAY_TAP_TEST_KAFKA`` (host:port) and ``GATEWAY_TAP_TEST_ES`` (URL) point at
external servers; PostgreSQL is the machine's server (``GATEWAY_TAP_TEST_PG``
overrides the admin DSN) with a database created for this run and dropped after.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway_tap.dev.servers import (
    POSTGRES_DEFAULT_DSN,
    ManagedProcess,
    NoidaServer,
    SeaweedServer,
    ensure_postgres,
    mock_llm_process,
)

pytest_plugins = [
    "tests.support.budget",  # budget_store / budget_store_settings (SQLite and PostgreSQL)
    "tests.support.redis",  # redis_url (session), own_redis (a server the test may stop), redis_prefix
]


@pytest.fixture(scope="session")
def noida(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NoidaServer | None]:
    """The noida-db process, or None when both services are external."""
    if os.environ.get("GATEWAY_TAP_TEST_KAFKA") and os.environ.get("GATEWAY_TAP_TEST_ES"):
        yield None
        return
    data_dir = tmp_path_factory.mktemp("noida")
    server = NoidaServer(data_dir=data_dir, log_path=data_dir / "noida.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(noida: NoidaServer | None) -> str:
    return os.environ.get("GATEWAY_TAP_TEST_KAFKA") or (noida.bootstrap if noida else "")


@pytest.fixture(scope="session")
def es_url(noida: NoidaServer | None) -> str:
    return os.environ.get("GATEWAY_TAP_TEST_ES") or (noida.es_url if noida else "")


@pytest.fixture(scope="session")
def external_es() -> bool:
    """True when the suite runs against a real Elasticsearch (features noida lacks can be tested)."""
    return bool(os.environ.get("GATEWAY_TAP_TEST_ES"))


@pytest.fixture
def topic_prefix() -> str:
    """A topic prefix unique to one test, so tests never see each other's events."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    dsn = os.environ.get("GATEWAY_TAP_TEST_PG", POSTGRES_DEFAULT_DSN)
    if "GATEWAY_TAP_TEST_PG" not in os.environ:
        ensure_postgres()
    return dsn


@pytest.fixture(scope="session")
async def pg_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """DSN of a database created for this test run and dropped afterwards."""
    import asyncpg

    name = f"gateway_tap_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base, _, _ = pg_admin_dsn.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def mock_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the mock LLM upstream, run as ``gateway-tap mock-llm`` in a child process."""
    log_dir: Path = tmp_path_factory.mktemp("mock-llm")
    proc: ManagedProcess = mock_llm_process(log_path=log_dir / "mock.log")
    proc.start()
    port = proc.env["GATEWAY_TAP_MOCK_PORT"]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """SeaweedFS (``weed mini``): the S3-compatible server of the run, started on first use, on free ports."""
    data_dir: Path = tmp_path_factory.mktemp("seaweed")
    server = SeaweedServer(data_dir=data_dir / "data", log_path=data_dir / "weed.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket on the test S3 for one test; its credentials are in the environment (AWS_* variables)."""
    import time

    import boto3

    name = f"lake-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id=seaweed.access_key,
                          aws_secret_access_key=seaweed.secret_key, region_name="us-east-1")
    for attempt in range(50):  # the filer may still be settling right after the start
        try:
            client.create_bucket(Bucket=name)
            break
        except Exception:
            if attempt == 49:
                raise
            time.sleep(0.2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    return name


@pytest.fixture(scope="session")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    import uvloop

    return uvloop.EventLoopPolicy()


@pytest.fixture(autouse=True)
def _keep_the_session_event_loop(event_loop_policy: asyncio.AbstractEventLoopPolicy) -> Iterator[None]:
    """Put the session's event loop back after each test.

    ``asyncio.run`` (called by CLI commands that sync tests invoke in the main thread)
    unsets the thread's current loop when it finishes, which would break every async
    test that follows with "There is no current event loop".
    """
    # Peek without get_event_loop(), which would create a stray loop when none is set yet.
    loop: asyncio.AbstractEventLoop | None = getattr(getattr(event_loop_policy, "_local", None), "_loop", None)
    yield
    if loop is not None and not loop.is_closed():
        event_loop_policy.set_event_loop(loop)
