"""Requests aiohttp's HTTP parser rejects before any route runs: ``gateway-tap serve`` answers them with the
OpenAI-style JSON error and a request id (431 oversize or too many headers, 414 long URL, 400 not HTTP),
with the limits from ``tap.limits``, over real sockets; the tap keeps serving afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import yaml
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.proxy.protocol import protocol_error
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, tap_config

LIMITS = {"max_header_bytes": 1024, "max_header_count": 20, "max_url_bytes": 2048}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


# --- the mapping, without a server --------------------------------------------------------------------------

@pytest.mark.parametrize(("exc", "status", "code", "message"), [
    (LineTooLong(b"x-big: aaa...", 1024), 431, "request_header_too_large",
     "a request header is longer than the 1024 byte limit (tap.limits.max_header_bytes)"),
    (LineTooLong(b"/aaa...", 2048), 414, "url_too_long",
     "the request URL is longer than the 2048 byte limit (tap.limits.max_url_bytes)"),
    (BadHttpMessage("Too many headers received"), 431, "too_many_request_headers",
     "the request has more than 20 headers (tap.limits.max_header_count)"),
    (BadHttpMethod("\x16\x03\x01"), 400, "bad_http_request",
     "the request is not valid HTTP: Received HTTPS traffic on an HTTP port"),
    (BadHttpMessage("Invalid header token:\n\n  b'Bad Header'\n      ^"), 400, "bad_http_request",
     "the request is not valid HTTP: Invalid header token"),
])
def test_protocol_errors_map_to_status_code_and_message(exc: Any, status: int, code: str, message: str) -> None:
    error = protocol_error(exc, max_header_bytes=1024, max_header_count=20, max_url_bytes=2048)
    assert (error.status, error.type, error.code, error.message) == (status, "invalid_request_error", code, message)


def test_equal_limits_name_both_keys() -> None:
    error = protocol_error(LineTooLong(b"...", 8190), max_header_bytes=8190, max_header_count=128,
                           max_url_bytes=8190)
    assert (error.status, error.message) == (
        431, "a request header is longer than the 8190 byte limit "
             "(tap.limits.max_header_bytes, or tap.limits.max_url_bytes for the URL)")


# --- gateway-tap serve over real sockets --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tap_url(tmp_path_factory: pytest.TempPathFactory, mock_llm: str, kafka_bootstrap: str) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("protocol-errors")
    port = free_port()
    document = tap_config(mock_llm, kafka_bootstrap, "protocol-errors", tmp / "spool", port=port,
                          tap={"limits": LIMITS})
    config = tmp / "tap.yaml"
    config.write_text(yaml.safe_dump(document))
    proc = ManagedProcess("tap", cli_argv("serve", "--config", str(config)),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                          env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET}, log_path=tmp / "tap.log", start_timeout=60)
    with proc:
        yield f"http://127.0.0.1:{port}"
    log = (tmp / "tap.log").read_text()
    assert "request rejected by the HTTP parser: 431 request_header_too_large" in log
    assert "a" * 100 not in log  # none of the client's oversize bytes in the tap's log


async def raw_request(url: str, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection; the status, headers and body of the answer, read until the tap closes
    the connection (as it does after rejecting a request it could not parse)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)  # to EOF: the connection is closed after the answer
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def request(target: str = "/healthz", headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: tap", *(f"{k}: {v}" for k, v in headers or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_json_error(status: int, headers: dict[str, str], body: bytes, want_status: int, code: str) -> None:
    assert status == want_status
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code
    assert error["request_id"] == headers["x-request-id"] and error["request_id"].startswith("req_")


async def test_a_header_over_the_limit_gets_431_json(tap_url: str) -> None:
    status, headers, body = await raw_request(tap_url, request(headers=[("x-big", "a" * 1100)]))
    assert_json_error(status, headers, body, 431, "request_header_too_large")
    assert orjson.loads(body)["error"]["message"] == \
        "a request header is longer than the 1024 byte limit (tap.limits.max_header_bytes)"
    # Just under the configured limit passes (and aiohttp's default, 8190, would have let 1100 through too).
    status, _, _ = await raw_request(tap_url, request(headers=[("x-big", "a" * 900), ("connection", "close")]))
    assert status == 200


async def test_too_many_headers_get_431_json(tap_url: str) -> None:
    many = [(f"x-h{i}", "1") for i in range(25)]
    status, headers, body = await raw_request(tap_url, request(headers=many))
    assert_json_error(status, headers, body, 431, "too_many_request_headers")
    assert "more than 20 headers" in orjson.loads(body)["error"]["message"]


async def test_a_url_over_the_limit_gets_414_json(tap_url: str) -> None:
    status, headers, body = await raw_request(tap_url, request(target="/llm/openai/v1/models?q=" + "b" * 2100))
    assert_json_error(status, headers, body, 414, "url_too_long")


async def test_bytes_that_are_not_http_get_400_json(tap_url: str) -> None:
    status, headers, body = await raw_request(tap_url, b"GET / HTTP/1.1\r\nHost: tap\r\nBad Header\r\n\r\n")
    assert_json_error(status, headers, body, 400, "bad_http_request")
    assert orjson.loads(body)["error"]["message"].startswith("the request is not valid HTTP: ")


async def test_sdk_clients_see_the_431_as_an_api_error(tap_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{tap_url}/llm/openai/v1", api_key=APP_KEY, max_retries=0,
                                default_headers={"x-big": "c" * 2000})
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert caught.value.status_code == 431
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "request_header_too_large"
    # The tap is fine afterwards: the same client without the oversize header gets its answer.
    ok = openai.AsyncOpenAI(base_url=f"{tap_url}/llm/openai/v1", api_key=APP_KEY, max_retries=0)
    reply = await ok.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert reply.choices[0].message.content
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{tap_url}/healthz")).status_code == 200
