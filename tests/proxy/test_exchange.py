"""Unit tests of what gateway_tap/proxy/redaction.py lets into events: redacted headers, captured bodies."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway_tap.admin.state import new_key
from gateway_tap.proxy.redaction import PATTERNS_ONLY, REDACTED, Redactor


def redact_headers(headers: dict[str, str] | CIMultiDict[str]) -> dict[str, str]:
    return PATTERNS_ONLY.redact_headers(headers)


def capture_body(body: bytes, limit: int) -> str | None:
    return PATTERNS_ONLY.body(body, limit, None)


def test_redact_headers_hides_credentials_and_lowercases_names() -> None:
    headers = CIMultiDict({
        "Authorization": "Bearer sk-live-123456789",
        "X-API-Key": "gt-abcdefgh",
        "api-key": "azure-key",
        "Cookie": "session=abc",
        "Proxy-Authorization": "Basic dXNlcjpwYXNz",
        "OpenAI-Organization": "org-1",
        "X-Upstream-Token": "t",
        "X-Client-Secret": "s",
        "X-Session-Id": "42",
        "X-Auth-User": "alice",
        "Content-Type": "application/json",
        "User-Agent": "OpenAI/Python 1.50.0",
        "X-Request-Id": "req-1",
    })
    assert redact_headers(headers) == {
        "authorization": REDACTED,
        "x-api-key": REDACTED,
        "api-key": REDACTED,
        "cookie": REDACTED,
        "proxy-authorization": REDACTED,
        "openai-organization": REDACTED,
        "x-upstream-token": REDACTED,
        "x-client-secret": REDACTED,
        "x-session-id": REDACTED,
        "x-auth-user": REDACTED,
        "content-type": "application/json",
        "user-agent": "OpenAI/Python 1.50.0",
        "x-request-id": "req-1",
    }
    assert REDACTED == "[REDACTED]"


def test_redact_headers_bounds_values_and_count() -> None:
    assert redact_headers({"x-long": "v" * 600}) == {"x-long": "v" * 512 + "...[truncated]"}
    many = {f"x-h{i}": str(i) for i in range(100)}
    assert redact_headers(many) == {f"x-h{i}": str(i) for i in range(64)}


def test_capture_body_redacts_json_secrets_and_key_patterns() -> None:
    body = (b'{"model": "gpt-4o", "api_key": "k-1", "Password" : "hunter2", "access_token":"tok",'
            b' "note": "use sk-proj-ABCDEFGH1234 or gt-demo-key-xyz", "auth": "Bearer abc.def-ghi_jkl"}')
    assert capture_body(body, 4096) == (
        '{"model": "gpt-4o", "api_key": "[REDACTED]", "Password" : "[REDACTED]", "access_token":"[REDACTED]",'
        ' "note": "use [REDACTED] or [REDACTED]", "auth": "Bearer [REDACTED]"}')


def test_capture_body_clips_and_marks_truncation() -> None:
    assert capture_body(b'{"messages": []}', 4096) == '{"messages": []}'
    assert capture_body(b"0123456789", 4) == "0123...[truncated]"
    assert capture_body(b"0123", 4) == "0123"
    assert capture_body(b"", 4096) is None
    assert capture_body(b"abc", 0) is None


def test_capture_body_replaces_a_multibyte_character_cut_by_the_limit() -> None:
    assert capture_body("é".encode() * 3, 3) == "é\ufffd...[truncated]"


def test_capture_body_redacts_a_secret_value_cut_by_the_limit() -> None:
    body = b'{"password": "correcthorsebatterystaple", "model": "gpt-4o"}'
    assert capture_body(body, 25) == '{"password": "[REDACTED]"...[truncated]'
    assert capture_body(body, 14) == '{"password": "[REDACTED]"...[truncated]'


def test_capture_body_redacts_a_secret_value_with_escaped_quotes() -> None:
    body = b'{"api_key": "ab\\"cd-secret-value\\\\", "model": "gpt-4o"}'
    assert capture_body(body, 4096) == '{"api_key": "[REDACTED]", "model": "gpt-4o"}'
    assert capture_body(body, 16) == '{"api_key": "[REDACTED]"...[truncated]'  # cut right after the backslash


ISSUED_KEY = new_key()[0]
SECRET = "upstream-secret-value"


def test_a_secret_cut_by_the_capture_limit_leaks_no_beginning() -> None:
    redactor = Redactor([SECRET])
    body = f"error: bad key {SECRET} given".encode()
    for limit in range(len("error: bad key ") + 4, len("error: bad key ") + len(SECRET)):
        captured = redactor.body(body, limit, None)
        assert captured == f"error: bad key {REDACTED}...[truncated]", limit
    presented = "zQ81mXvB0kLw3rTy"
    assert redactor.body(f"x {presented}".encode(), 9, presented) == f"x {REDACTED}...[truncated]"
    for shaped in (ISSUED_KEY, "sk-proj-ABCDEFGHIJKLMNOP", "Bearer abcdefghijklmnop"):
        assert redactor.body(f"see {shaped} ok".encode(), 12, None) == "see " + (
            "Bearer " if shaped.startswith("Bearer") else "") + REDACTED + "...[truncated]", shaped


def test_shapes_and_names_redacted_outside_json() -> None:
    redactor = Redactor(["short", "a-long-upstream-key"])
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    assert redactor.text(f"token {jwt} end") == f"token {REDACTED} end"
    assert redactor.text("client_secret=abc&pwd=x1&keep=1") == f"client_secret={REDACTED}&pwd={REDACTED}&keep=1"
    assert redactor.text("A-LONG-UPSTREAM-KEY in upper case") == f"{REDACTED} in upper case"
    assert redactor.text("short stays: too short to be scrubbed verbatim") == \
        "short stays: too short to be scrubbed verbatim"
    assert redactor.text("nothing secret here, model gpt-4o-mini") == "nothing secret here, model gpt-4o-mini"


def test_a_header_value_clipped_inside_a_secret_leaks_no_beginning() -> None:
    value = "v" * 504 + " " + ISSUED_KEY
    out = PATTERNS_ONLY.redact_headers({"x-note": value})["x-note"]
    assert ISSUED_KEY[:6] not in out and out == "v" * 504 + " " + REDACTED[:7] + "...[truncated]"


def test_a_record_is_searched_once_and_kept_as_it_is_when_nothing_could_be_a_secret() -> None:
    redactor = Redactor([SECRET])
    clean = ["/llm/openai/v1/chat/completions", "OpenAI/Python 1.50.0", "application/json"]
    assert redactor.scrubber(None, clean)("anything") == "anything"  # kept: no search per string
    for hidden in (SECRET.upper(), "sk-proj-ABCDEFGHIJKL", "x-token=1", "zQ81mXvB0kLw3rTy"):
        scrub = redactor.scrubber("zQ81mXvB0kLw3rTy", [*clean, f"note {hidden}"])
        assert scrub(f"note {hidden}") != f"note {hidden}", hidden
