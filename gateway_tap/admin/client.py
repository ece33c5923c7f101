"""A small synchronous client of the admin API (what ``gateway-tap admin ...`` calls)."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


class AdminClientError(Exception):
    """The API answered with an error (``status``, ``code``, ``message``) or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message


class AdminClient:
    """``call(method, path, body)`` against ``base_url`` with the admin token."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s

    def call(self, method: str, path: str, body: Any = None, params: dict[str, str | None] | None = None) -> Any:
        """The decoded JSON answer (None for 204). :raises AdminClientError: on any error."""
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = self.base_url + path + (f"?{query}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method, headers={
            "authorization": f"Bearer {self._token}", "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                error = json.loads(raw)["error"]
                raise AdminClientError(exc.code, error["code"], error["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise AdminClientError(exc.code, "http_error", raw[:200].decode(errors="replace")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminClientError(0, "unreachable", f"cannot reach the admin API at {self.base_url}: {reason}") \
                from None
        return json.loads(raw) if raw else None
