"""Issue 21 item 4: slow clients are closed (``tap.limits.header_timeout_s``, ``body_timeout_s``,
``keepalive_timeout_s``) while everyone else is served.

Against the real tap with short timeouts (2 s for a head and a body, 3 s idle between requests), 300 sockets
misbehave at once: 100 connect and send nothing, 100 send a request head one byte at a time, 50 send a whole
head and then their body one byte at a time, 50 make one request and then stay idle. On the previous main all of
them stayed open (aiohttp's keep-alive timer is an hour and nothing bounded a head or a body). While they are
open a normal client is served; then every one of them is closed by the tap, each slow body with a recorded
408 ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.support.hostile_upstream import HostileUpstream, raw_request
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, RunningTap, events_for, running_tap, tap_config

LIMITS = {"header_timeout_s": 2.0, "body_timeout_s": 2.0, "keepalive_timeout_s": 3.0}
CLOSE_WITHIN_S = 20.0  # far beyond the timeouts: only a tap that never closes them misses it
TRICKLE_S = 0.3
PREFIX = "sec-slow"
CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@dataclass
class Slow:
    kind: str
    opened: float
    closed_after_s: float | None = None
    received: bytes = b""


@pytest.fixture(scope="module")
async def tap(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningTap]:
    os.environ["TAP_TEST_UPSTREAM_KEY"] = UPSTREAM_SECRET
    spool: Path = tmp_path_factory.mktemp("slow-clients")
    async with HostileUpstream() as upstream:
        document = tap_config(upstream.url, kafka_bootstrap, PREFIX, spool, tap={"limits": LIMITS})
        async with running_tap(document) as running:
            yield running


async def _misbehave(url: str, kind: str) -> Slow:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    slow = Slow(kind, time.monotonic())
    head = b"POST /llm/openai/v1/chat/completions HTTP/1.1\r\nHost: tap\r\n"
    if kind == "slow-body":
        writer.write(head + f"Authorization: Bearer {APP_KEY}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: 100000\r\n\r\n{{".encode())
    elif kind == "slow-header":
        writer.write(head + b"X-Slow: ")
    elif kind == "keepalive":
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: tap\r\n\r\n")
    try:
        async with asyncio.timeout(CLOSE_WITHIN_S):
            while True:
                if kind in ("slow-body", "slow-header"):
                    writer.write(b"a")  # one byte at a time, for ever: only a timeout ends this
                    await writer.drain()
                try:
                    async with asyncio.timeout(TRICKLE_S):
                        data = await reader.read(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                slow.received += data
        slow.closed_after_s = time.monotonic() - slow.opened
    except ConnectionError:  # reset by the tap (it closed while we were writing)
        slow.closed_after_s = time.monotonic() - slow.opened
    except TimeoutError:
        pass  # still open after CLOSE_WITHIN_S
    finally:
        writer.close()
    return slow


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return out


async def test_slow_clients_are_closed_while_others_are_served(tap: RunningTap, kafka_bootstrap: str) -> None:
    kinds = ["idle"] * 100 + ["slow-header"] * 100 + ["slow-body"] * 50 + ["keepalive"] * 50
    tasks = []
    for i, kind in enumerate(kinds):
        tasks.append(asyncio.create_task(_misbehave(tap.url, kind)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # in bursts the accept queue (128) takes: none is refused
    await asyncio.sleep(0.5)  # all 300 connected and misbehaving
    normal = await raw_request(tap.url, "/llm/openai/v1/chat/completions", method="POST", body=CHAT,
                               headers={"Authorization": f"Bearer {APP_KEY}", "content-type": "application/json"})
    assert normal.status == 200
    assert sum(not t.done() for t in tasks) > 250, "the slow sockets were still open while the client was served"
    slows = await asyncio.gather(*tasks)

    still_open = [s.kind for s in slows if s.closed_after_s is None]
    assert not still_open, f"{len(still_open)} sockets not closed within {CLOSE_WITHIN_S} s: {set(still_open)}"
    # No earlier than its timeout: a head's from the start, an idle keep-alive's from its answer.
    for slow in slows:
        assert slow.closed_after_s is not None
        assert slow.closed_after_s >= (LIMITS["keepalive_timeout_s"] if slow.kind == "keepalive"
                                       else LIMITS["header_timeout_s"]) - 0.1, slow
    for slow in slows:
        answers = _responses(slow.received)
        if slow.kind in ("idle", "slow-header"):
            assert answers == [], slow  # no request ever completed: nothing to answer or record
        elif slow.kind == "keepalive":
            assert [a[0] for a in answers] == [200], slow
    timed_out = [_responses(s.received) for s in slows if s.kind == "slow-body"]
    request_ids = []
    for answers in timed_out:
        [(status, headers, body)] = answers
        error = orjson.loads(body)["error"]
        assert (status, error["code"]) == (408, "request_timeout")
        assert "tap.limits.body_timeout_s" in error["message"]
        assert headers["x-request-id"] == error["request_id"]
        assert headers["connection"].lower() == "close"
        request_ids.append(error["request_id"])
    logs = await events_for(kafka_bootstrap, PREFIX, request_ids)
    assert sorted(logs) == sorted(request_ids)
    assert {(log.status_code, log.error.code) for log in logs.values()} == {(408, "request_timeout")}
    # And the tap serves as before.
    after = await raw_request(tap.url, "/llm/openai/v1/chat/completions", method="POST", body=CHAT,
                              headers={"Authorization": f"Bearer {APP_KEY}", "content-type": "application/json"})
    assert after.status == 200
