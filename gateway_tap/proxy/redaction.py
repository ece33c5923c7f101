"""What a record may not hold: credentials in headers, bodies, paths, user agents, metadata and error messages.

Three layers, all applied by :class:`Redactor` (built once per configuration snapshot):

- by header name: ``authorization``, ``x-api-key``, cookies and every name containing ``token``, ``secret``,
  ``key``, ``password``, ``auth`` or ``session`` are replaced whole by :data:`REDACTED`;
- verbatim: the upstream keys the tap holds (every LLM's ``api_key_env`` value) and the key the request presented
  (``Authorization: Bearer`` / ``x-api-key``), wherever they appear, also cut at a captured body's end;
- by shape: issued app keys (``gt-...``), ``sk-...`` keys, bearer tokens, JWTs, AWS access key ids, the values of
  JSON fields and form fields named like secrets (``"password": ...``, ``password=...``, ``api_key=...``).

docs/security.md says what this does not catch (a secret of no known shape under an innocent name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import partial

from gateway_tap.proxy.bounds import HEADER_NAME_CHARS, HEADER_VALUE_CHARS, HEADERS_MAX, clip
from schemas.wire import TRUNCATED

REDACTED = "[REDACTED]"
MIN_SECRET_CHARS = 8
"""Known secrets shorter than this are not scrubbed verbatim (a one-letter key would blank every text)."""
_SCANNED_VALUE_CHARS = HEADER_VALUE_CHARS + 256
"""A header value is scrubbed over this many characters, then clipped: no secret (all shorter than 256) that the
clip would cut leaks its beginning."""
_MIN_PARTIAL_CHARS = 4
"""A captured body cut inside a known secret: its last characters are redacted when they are this many or more
of the secret's beginning."""

SENSITIVE_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie",
                               "set-cookie", "x-goog-api-key", "openai-organization", "openai-project"})
_SENSITIVE_WORDS = ("token", "secret", "key", "password", "auth", "session")
_SECRET_NAMES = r"api[_-]?key|password|passwd|secret|client_secret|token|access_token|refresh_token|authorization"
# Group 1: a JSON field named like a secret: its string value ends at its closing quote (escaped quotes included)
# or, when the capture limit cut it, at the end of the text: a clipped value must not leak its beginning.
# Group 2: a form or query field named like a secret (``password=...``). The rest: secrets by their shape.
_SHAPES = (
    rf'("(?:{_SECRET_NAMES})"\s*:\s*)"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'
    rf"|(?<!\w)((?:{_SECRET_NAMES}|pwd)=)[^&\s\"']*"
    r"|\bsk-[\w-]{8,}|\bgt-[\w-]{8,}|(?<=bearer )[\w.~+/=-]{8,}"
    r"|\beyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]*|\bAKIA[0-9A-Z]{16}\b"
)
# Every secret above (shapes and names) holds one of these, lowered: a record with none needs no scrubbing.
_ANCHORS = ("passw", "pwd", "secret", "token", "key", "authoriz", "sk-", "gt-", "bearer", "eyj", "akia")
# A capture cut in the middle of a secret of known shape: what is left of it at the very end.
_CUT_SHAPE = re.compile(r"(?i)(?:\b(?:sk|gt)-[\w-]*|(?<=bearer )[\w.~+/=-]*|\beyJ[\w.-]*)\Z")

_sensitive_cache: dict[str, bool] = {}


def _is_sensitive(key: str) -> bool:
    known = _sensitive_cache.get(key)
    if known is None:
        known = key in SENSITIVE_HEADERS or any(word in key for word in _SENSITIVE_WORDS)
        if len(_sensitive_cache) < 4096:  # header names repeat; a hostile client cannot grow this forever
            _sensitive_cache[key] = known
    return known


def _replace(match: re.Match[str]) -> str:
    field, form = match.group(1), match.group(2)
    if field is not None:
        return field + '"' + REDACTED + '"'
    if form is not None:
        return form + REDACTED
    return REDACTED


class Redactor:
    """Scrubs ``secrets`` (verbatim) and secret-shaped text from what a record captures.

    :param secrets: values the tap knows to be secret (its upstream keys); those shorter than
        :data:`MIN_SECRET_CHARS` are ignored.
    """

    __slots__ = ("_anchors", "_pattern", "_secrets")

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first: a secret containing another is replaced whole.
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True))
        literal = "".join(re.escape(s) + "|" for s in self._secrets)
        self._pattern = re.compile(f"(?i){literal}{_SHAPES}")
        # Case-sensitive over lowered text: several times faster than the same search with IGNORECASE.
        self._anchors = re.compile("|".join(re.escape(a) for a in (*_ANCHORS, *(s.lower() for s in self._secrets))))

    def scrubber(self, presented: str | None, texts: Iterable[str]) -> Callable[[str], str]:
        """What scrubs the strings of one record: ``texts`` are all of them, looked at once (one search of their
        lowered concatenation for anything a secret holds). When none could hold a secret (the common case: one
        search instead of a full one per string), the strings are kept as they are."""
        blob = "\n".join(texts).lower()
        if (presented is not None and presented.lower() in blob) or self._anchors.search(blob) is not None:
            return partial(self.text, presented=presented)
        return kept

    def text(self, value: str, presented: str | None = None) -> str:
        """``value`` with every secret replaced by :data:`REDACTED`; ``presented`` is the request's own key."""
        if presented is not None and presented in value:
            value = value.replace(presented, REDACTED)
        return self._pattern.sub(_replace, value)

    @staticmethod
    def headers(headers: Mapping[str, str]) -> tuple[dict[str, str], bool]:
        """Header name (lower case, clipped) to value, credential headers replaced whole, at most
        :data:`HEADERS_MAX` of them, and whether a value is longer than :data:`HEADER_VALUE_CHARS`. The values are
        still to scrub and clip (:func:`finish_headers`), cut to what that needs (a secret straddling
        :data:`HEADER_VALUE_CHARS` is still seen whole)."""
        out: dict[str, str] = {}
        long = False
        for name, value in headers.items():
            key = name.lower()
            if len(key) > HEADER_NAME_CHARS:
                key = clip(key, HEADER_NAME_CHARS)
            if _is_sensitive(key):
                out[key] = REDACTED
            else:
                if len(value) > HEADER_VALUE_CHARS:
                    long = True
                    value = value[:_SCANNED_VALUE_CHARS]
                out[key] = value
            if len(out) >= HEADERS_MAX:
                break
        return out, long

    def redact_headers(self, headers: Mapping[str, str], presented: str | None = None) -> dict[str, str]:
        """``headers`` alone as a record holds them: :meth:`headers`, scrubbed and clipped."""
        out, long = self.headers(headers)
        return finish_headers(out, long, self.scrubber(presented, out.values()))

    def body(self, body: bytes, limit: int, presented: str | None) -> str | None:
        """The first ``limit`` bytes of ``body`` as text, secrets redacted (also one the limit cut in two)."""
        if not body or limit <= 0:
            return None
        text = self.text(body[:limit].decode("utf-8", errors="replace"), presented)
        if len(body) <= limit:
            return text
        return self._redact_cut(text, presented) + TRUNCATED

    def _redact_cut(self, text: str, presented: str | None) -> str:
        """``text`` (cut at the capture limit) without the beginning of a secret at its very end."""
        text = _CUT_SHAPE.sub(REDACTED, text)
        lowered = text[-256:].lower()
        for secret in (presented, *self._secrets) if presented is not None else self._secrets:
            for n in range(min(len(secret) - 1, len(lowered)), _MIN_PARTIAL_CHARS - 1, -1):
                if lowered.endswith(secret[:n].lower()):
                    return text[:-n] + REDACTED
        return text


def finish_headers(headers: dict[str, str], long: bool, scrub: Callable[[str], str]) -> dict[str, str]:
    """What :meth:`Redactor.headers` returned, its values scrubbed and clipped to :data:`HEADER_VALUE_CHARS`."""
    if scrub is kept and not long:
        return headers
    return {k: clip(scrub(v), HEADER_VALUE_CHARS) for k, v in headers.items()}


def kept(value: str) -> str:
    """The scrubber of a record nothing of which could hold a secret."""
    return value


PATTERNS_ONLY = Redactor()
"""A redactor that knows no secret values: names and shapes only (records built outside a snapshot)."""
