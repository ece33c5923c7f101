"""Issue 21 item 5: every client-controlled string that reaches an event or a log line is bounded, and no event
is dropped for its size.

A 2,000,000-character ``model`` used to drop the analytics event (larger than ``max_batch_bytes``) and write a
2 MB access-log line. Against the real tap (events to Kafka, the mock LLM echoing the model back) and its access
log: the model, user agent, path, header names and values and plugin metadata are clipped to the bounds of
``gateway_tap/proxy/py`` (listed in docs/security.md) with ``...[truncated]``, all three events arrive,
and the publisher dropped nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from gateway_tap.hooks import HookContext, TapRequest
from gateway_tap.proxy.logs import JsonFormatter
from schemas import Analytics, BudgetUsage, ProxyLog
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, by_request, read_events, running_tap, tap_config

# The bounds docs/security.md states (gateway_tap/proxy/py), in characters.
MODEL_CHARS, USER_AGENT_CHARS, PATH_CHARS, ERROR_MESSAGE_CHARS = 256, 512, 2048, 1024
HEADER_NAME_CHARS, HEADER_VALUE_CHARS, HEADERS_MAX = 128, 512, 64
METADATA_VALUE_CHARS, METADATA_MAX = 1024, 64
PREFIX_OK = 64 * 1024
"""No access log line of these requests may come near this (the 2 MB model wrote one of 2 MB)."""
MARK = "...[truncated]"


class HeaderToMetadata:
    """Copies every ``x-meta-*`` request header into the request's metadata, as an enrichment plugin might."""

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> None:
        for name, value in request.headers.items():
            if name.lower().startswith("x-meta-"):
                ctx.metadata[name.lower()] = value


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    handler = _Lines()
    logger = logging.getLogger("gateway_tap.access")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.fixture
async def tap(mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", plugins=[
        {"name": "meta", "use": f"{__name__}:HeaderToMetadata"}])
    async with running_tap(document) as running:
        yield running


def _clipped(text: str, limit: int) -> str:
    return text[:limit] + MARK


async def test_a_two_million_character_model_keeps_every_event_clipped(
        tap: RunningTap, kafka_bootstrap: str, topic_prefix: str, access_lines: list[str]) -> None:
    model = "m" * 2_000_000
    agent = "agent/" + "u" * 7000
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{tap.url}/llm/openai/v1/chat/completions",
                             json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                             headers={"authorization": f"Bearer {APP_KEY}", "user-agent": agent,
                                      "x-meta-big": "v" * 7000, "x-" + "n" * 1000: "named"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["model"] == model  # the client's answer is the upstream's, untouched
            rid = resp.headers["x-request-id"]
        async with http.get(tap.metrics_url) as resp:
            metrics = await resp.text()
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))
    assert set(events.get(rid, {})) == {"proxy_log", "analytics", "budget_usage"}, "an event was dropped"
    analytics, usage, log = events[rid]["analytics"], events[rid]["budget_usage"], events[rid]["proxy_log"]
    assert isinstance(analytics, Analytics) and isinstance(usage, BudgetUsage) and isinstance(log, ProxyLog)
    assert analytics.model == usage.model == analytics.request_model == analytics.response_model \
        == _clipped(model, MODEL_CHARS)
    assert analytics.total_tokens == usage.total_tokens > 0  # still accounted (no price for this model)
    assert log.user_agent == _clipped(agent, USER_AGENT_CHARS)
    assert log.request_headers["user-agent"] == _clipped(agent, HEADER_VALUE_CHARS)
    assert log.request_headers["x-" + "n" * (HEADER_NAME_CHARS - 2) + MARK] == "named"
    assert log.metadata["x-meta-big"] == analytics.tags["x-meta-big"] == _clipped("v" * 7000,
                                                                                  METADATA_VALUE_CHARS)
    dropped = re.findall(r"^gateway_tap_publisher_events_dropped_total\{[^}]*\} (\S+)$", metrics, re.M)
    assert dropped and all(float(v) == 0 for v in dropped)
    [line] = [line for line in access_lines if rid in line]
    assert len(line) < PREFIX_OK
    assert orjson.loads(line)["model"] == _clipped(model, MODEL_CHARS)


async def test_long_paths_many_headers_and_much_metadata_are_bounded(
        tap: RunningTap, kafka_bootstrap: str, topic_prefix: str, access_lines: list[str]) -> None:
    path = "/llm/openai/v1/" + "p" * 6000
    many = {f"x-meta-{i}": str(i) for i in range(100)}
    async with aiohttp.ClientSession() as http:
        async with http.post(tap.url + path, json={"model": "gpt-4o-mini"},
                             headers={"authorization": f"Bearer {APP_KEY}", **many}) as resp:
            rid = resp.headers["x-request-id"]
            await resp.read()
        async with http.get(f"{tap.url}/nowhere/" + "q" * 6000) as resp:
            assert resp.status == 404
            missing = resp.headers["x-request-id"]
    events = by_request(await read_events(kafka_bootstrap, topic_prefix, count=3))
    log = events[rid]["proxy_log"]
    assert isinstance(log, ProxyLog)
    assert log.path == _clipped(path, PATH_CHARS)
    assert len(log.request_headers) == HEADERS_MAX
    assert len(log.metadata) == METADATA_MAX
    not_found = events[missing]["proxy_log"]
    assert isinstance(not_found, ProxyLog) and not_found.status_code == 404
    assert not_found.path == _clipped("/nowhere/" + "q" * 6000, PATH_CHARS)
    assert not_found.error is not None and len(not_found.error.message) <= ERROR_MESSAGE_CHARS + len(MARK)
    assert all(len(line) < PREFIX_OK for line in access_lines)
