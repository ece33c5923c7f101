"""Unit tests of what gateway_tap/proxy/exchange.py lets into events: redacted headers, captured bodies."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway_tap.proxy.exchange import REDACTED, capture_body, redact_headers


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
    assert redact_headers({"x-long": "v" * 600}) == {"x-long": "v" * 512}
    many = {f"x-h{i}": str(i) for i in range(100)}
    assert redact_headers(many) == {f"x-h{i}": str(i) for i in range(64)}
    assert redact_headers(many, limit=3) == {"x-h0": "0", "x-h1": "1", "x-h2": "2"}


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
