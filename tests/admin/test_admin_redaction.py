"""The redaction rules cover what the admin API adds: issued keys (``gt-`` + 43 URL-safe characters) are
redacted from captured headers and bodies, and never stored, answered or logged after issue."""

from __future__ import annotations

from multidict import CIMultiDict

from gateway_tap.admin.state import KEY_PREFIX_CHARS, new_key
from gateway_tap.proxy.redaction import PATTERNS_ONLY, REDACTED


def test_issued_keys_are_redacted_from_headers_and_bodies() -> None:
    for _ in range(200):  # URL-safe secrets: '-' and '_' anywhere, never one that escapes the pattern
        secret, digest, prefix = new_key()
        assert prefix == secret[:KEY_PREFIX_CHARS] and secret not in digest
        headers = PATTERNS_ONLY.redact_headers(CIMultiDict({"Authorization": f"Bearer {secret}", "x-api-key": secret}))
        assert headers == {"authorization": REDACTED, "x-api-key": REDACTED}
        body = f'{{"messages": [{{"role": "user", "content": "my key is {secret}, keep it"}}]}}'.encode()
        captured = PATTERNS_ONLY.body(body, 4096, None)
        assert captured is not None and secret not in captured and secret[KEY_PREFIX_CHARS:] not in captured
        assert REDACTED in captured
