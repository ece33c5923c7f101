"""Issue 21: property-based. Whatever bytes a client puts in its request line, headers, path or body:

- every answer is the tap's JSON error or the upstream's proxied answer, with a request id;
- exactly one proxy_log per request id arrives, through the real publisher and Kafka (noida-db);
- the tap stays healthy (it serves a normal request afterwards, its process alive);
- nothing outside ``upstream_url``'s path is ever requested upstream.

``gateway-tap serve`` runs as a child process (the real server, its TapRunner and guard); the upstream is the
tests' own recording one (:class:`HostileUpstream`, in a thread of its own). Each request goes on a new
connection, written as generated. Framing headers (``Content-Length``, ``Transfer-Encoding``, ``Connection``,
``Upgrade``) are never generated: a request whose declared body never comes waits for its body timeout, and
smuggling is tested elsewhere (a body is always framed by the test). Example counts keep the whole run near
15-25 s here; failures print a reproduction blob.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from tests.support.hostile_upstream import HostileUpstream, _unchunk
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, all_proxy_logs, tap_config

BASE = "/deployments/fuzz"
"""``upstream_url``'s path of the LLM ``based``; ``openai`` and ``anthropic`` have :data:`OTHER_BASE`."""
OTHER_BASE = "/v0/other"
PREFIX = "sec-fuzz"
LIMITS = {"max_header_bytes": 2048, "max_header_count": 40, "max_url_bytes": 4096}
FRAMING = {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"keep-alive", b"te", b"trailer"}
PROBES = {"/healthz", "/readyz"}
SETTINGS = settings(max_examples=50, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


class ThreadedUpstream:
    """:class:`HostileUpstream` served by an event loop in a thread of its own (the test itself is synchronous)."""

    def __init__(self) -> None:
        self.upstream = HostileUpstream()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-upstream", daemon=True)

    def __enter__(self) -> HostileUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.upstream.__aenter__(), self._loop).result(30)
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.upstream.__aexit__(None, None, None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Tap:
    url: str
    port: int
    upstream: HostileUpstream
    process: ManagedProcess


@pytest.fixture(scope="module")
def tap(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tap]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    with ThreadedUpstream() as upstream:
        port = free_port()
        document = tap_config(upstream.url + OTHER_BASE, kafka_bootstrap, PREFIX, tmp / "spool", port=port,
                              tap={"limits": LIMITS, "capture_bodies": True}, extra_llms=[
                                  {"id": "based", "vendor": "openai", "upstream_url": upstream.url + BASE,
                                   "api_key_env": "TAP_TEST_UPSTREAM_KEY"}])
        config = tmp / "tap.yaml"
        config.write_text(yaml.safe_dump(document))
        proc = ManagedProcess("tap", cli_argv("serve", "--config", str(config), "--workers", "1"),
                              ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                              env={"TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET}, log_path=tmp / "tap.log",
                              start_timeout=60)
        with proc:
            yield Tap(f"http://127.0.0.1:{port}", port, upstream, proc)


# --- what is sent ------------------------------------------------------------------------------------------

_NO_LINE_BREAK = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
_PATH_PIECES = st.sampled_from(["..", ".", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "\\", "/", "//", "%00", "%0d%0a",
                                ";", "%25", "%", "%zz", "%c3%a9", "é", "v1", "chat", "completions", "models",
                                "?", "?a=../..", "#", "%3f", "~", "@", ":", "%ff", "\x7f", " "])
_PATHS = st.one_of(
    st.lists(st.one_of(_PATH_PIECES, _TOKEN), max_size=12).map("".join),
    st.text(max_size=60),
)
_ROUTES = st.sampled_from(["/llm/based/", "/llm/openai/", "/llm/", "/", "/plugins/", "/budget", "/llm/based"])
_METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT", "get",
                            "P\x00ST", "MÉTHODE"])
_VERSIONS = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", "http/1.1", "HTTP/1", ""])
_HEADER_NAMES = st.one_of(_TOKEN.map(lambda t: ("x-" + t).encode()), _NO_LINE_BREAK.filter(lambda b: b":" not in b),
                          st.sampled_from([b"user-agent", b"authorization", b"x-api-key", b"content-type",
                                           b"expect", b"traceparent", b"host", b"x-forwarded-for", b"cookie"]))
_HEADERS = st.lists(st.tuples(_HEADER_NAMES, _NO_LINE_BREAK), max_size=12)
_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4), max_leaves=12)
_BODIES = st.one_of(st.binary(max_size=2048), _JSON.map(lambda v: json.dumps(v).encode()),  # ints past 64 bits too
                    st.builds(lambda model, extra: json.dumps({"model": model, "messages": extra}).encode(),
                              st.text(max_size=300), _JSON))

KEY = (b"authorization", f"Bearer {APP_KEY}".encode())


def frame(line: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A request with ``line`` and ``headers`` as generated; the body framed by the test (never by a header)."""
    kept = [(n, v) for n, v in headers if n.strip().lower() not in FRAMING]
    head = [line, b"Host: tap", b"Connection: close", b"Content-Length: " + str(len(body)).encode(),
            *(n + b": " + v for n, v in kept)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(port: int, raw: bytes, head_only: bool) -> Answer:
    """Send ``raw`` on a new connection and read the one final answer (1xx skipped), by its framing."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(raw)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, f"the tap closed the connection without an answer to {raw[:200]!r}"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            if status >= 200:
                break
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        if head_only or status in (204, 304):
            return Answer(status, headers, b"")
        while True:  # every answer here closes the connection: read to its end, then unframe
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return Answer(status, headers, _unchunk(buf))
    return Answer(status, headers, buf[:int(headers["content-length"])] if "content-length" in headers else buf)


class Checker:
    """Sends each generated request and checks its answer; remembers every request id for the log check."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.ids: list[str] = []

    def check(self, raw: bytes) -> None:
        method, _, rest = raw.partition(b" ")
        target = rest.partition(b" ")[0].decode("latin-1")
        answer = exchange(self.tap.port, raw, head_only=method == b"HEAD")
        rid = answer.headers.get("x-request-id")
        if rid is None:  # only a probe's own answer carries none
            assert method == b"GET" and target.partition("?")[0] in PROBES and answer.status < 500, (raw, answer)
            return
        assert rid.startswith("req_"), (raw, answer)
        self.ids.append(rid)
        proxied = self.tap.upstream.for_request(rid)
        if proxied or method == b"HEAD":
            return  # the upstream's answer, passed on (a HEAD has no body to look at)
        assert answer.headers.get("content-type", "").startswith("application/json"), (raw, answer)
        data = orjson.loads(answer.body)
        if answer.status >= 400:
            assert data["error"]["request_id"] == rid, (raw, answer)
            assert isinstance(data["error"]["code"], str) and data["error"]["type"], (raw, answer)
            assert data["error"]["code"] != "internal_error", (raw, answer, self.tap.process.log_tail())


def test_arbitrary_requests_are_answered_recorded_once_and_confined(tap: Tap, kafka_bootstrap: str) -> None:
    checker = Checker(tap)

    @SETTINGS
    @given(method=_METHODS, route=_ROUTES, path=_PATHS, version=_VERSIONS, junk=_NO_LINE_BREAK)
    def request_lines(method: str, route: str, path: str, version: str, junk: bytes) -> None:
        line = f"{method} {route}{path} {version}".encode("utf-8", "surrogateescape") + junk[:8]
        checker.check(frame(line, [KEY], b""))

    @SETTINGS
    @given(headers=_HEADERS, keyed=st.booleans())
    def headers(headers: list[tuple[bytes, bytes]], keyed: bool) -> None:
        sent = [KEY, (b"content-type", b"application/json")] if keyed else []
        body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
        checker.check(frame(b"POST /llm/based/v1/chat/completions HTTP/1.1", [*sent, *headers], body))

    @SETTINGS
    @given(path=_PATHS, route=st.sampled_from(["/llm/based/", "/llm/based/v1/"]))
    def paths(path: str, route: str) -> None:
        target = (route + path).encode("utf-8", "surrogateescape").replace(b" ", b"%20")
        checker.check(frame(b"POST " + target + b" HTTP/1.1", [KEY, (b"content-type", b"application/json")],
                            b'{"model":"gpt-4o-mini"}'))

    @SETTINGS
    @given(body=_BODIES, content_type=st.sampled_from([b"application/json", b"text/plain", b"",
                                                        b"application/x-www-form-urlencoded", b"json; charset=x"]),
           stream=st.booleans())
    def bodies(body: bytes, content_type: bytes, stream: bool) -> None:
        extra = [(b"x-hostile", b'usage-sse:{"prompt_tokens":3,"completion_tokens":2}')] if stream else []
        checker.check(frame(b"POST /llm/based/v1/chat/completions HTTP/1.1",
                            [KEY, (b"content-type", content_type), *extra], body))

    for prop in (request_lines, headers, paths, bodies):
        prop()

    # Exactly one proxy_log per request id, through the real publisher and Kafka.
    logs = asyncio.run(all_proxy_logs(kafka_bootstrap, PREFIX, count=len(checker.ids), wait_s=60))
    per_id = Counter(log.request_id for log in logs)
    missing = [rid for rid in checker.ids if per_id[rid] == 0]
    assert not missing, f"{len(missing)} of {len(checker.ids)} answers have no proxy_log: {missing[:5]}"
    assert len(set(checker.ids)) == len(checker.ids)
    twice = [rid for rid, n in per_id.items() if n > 1]
    assert not twice, f"recorded more than once: {twice[:5]}"

    # Nothing outside upstream_url's path ever went upstream, and the tap is healthy.
    for got in tap.upstream.received:
        decoded = unquote_to_bytes(got.path)
        assert got.path.startswith((BASE + "/", OTHER_BASE + "/")), got.target
        assert b"/../" not in decoded + b"/" and b"/./" not in decoded + b"/" and b"\\" not in decoded, got.target
    assert tap.process.running(), tap.process.log_tail()
    assert http_ok(f"{tap.url}/healthz")
    ok = exchange(tap.port, frame(b"POST /llm/based/v1/chat/completions HTTP/1.1",
                                  [KEY, (b"content-type", b"application/json")],
                                  b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'), False)
    assert ok.status == 200 and orjson.loads(ok.body)["choices"]
