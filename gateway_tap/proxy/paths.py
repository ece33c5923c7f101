"""The upstream path of a request: what follows ``/llm/{llm_id}/``, confined below the LLM's ``upstream_url``.

The tap sends its own upstream credential with every forwarded request, so the path it forwards must stay
inside ``upstream_url``'s path whatever the client wrote. :func:`confined_path` takes the path as the client
sent it (still percent-encoded) and returns it normalised, or refuses it with a 400:

- percent-encodings are normalised (RFC 3986 §6.2.2.2: escapes of unreserved characters decoded, the others
  in upper case), so ``%2e%2e`` *is* ``..`` and ``%63hat`` is ``chat`` for the hooks and the upstream alike;
- dot-segments are removed (RFC 3986 §5.2.4) after that decoding; one that climbs above the LLM's base path
  is refused (``path_outside_upstream``) rather than clamped as the RFC would;
- what an upstream might read as a separator or a dot-segment is refused rather than guessed at
  (``invalid_path``): an encoded ``/``, a ``\\`` (encoded or not), an empty segment (``//``), a NUL or other
  control character, a malformed ``%`` escape, a double-encoded ``.``, ``/``, ``\\`` or NUL (``%252e``), and
  ``..;x`` / ``.;x`` (dot-segments to servlet containers, which strip ``;`` parameters).

A single trailing ``/`` is kept. The query string is not part of the path and passes through unchanged.
"""

from __future__ import annotations

import re

from gateway_tap.proxy.errors import invalid_path, path_outside_upstream

_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Once unreserved characters are decoded, what remains escaped and must not be in a segment: "/" and "\" (a
# separator to some servers), control characters (NUL, CR, LF...), and a "%25" that would decode, once more
# downstream, to one of those or to ".".
_HOSTILE_ESCAPE = re.compile(r"%(?:2F|5C|[01][0-9A-F]|7F|25(?:2[EeFf]|5[Cc]|[01][0-9A-Fa-f]|7[Ff]))")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# A path without any of these is already in normal form (the fast path: most requests, one search).
_SUSPECT = re.compile(r"[%.\\;\x00-\x1f\x7f]|//|^/")


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def confined_path(raw: str) -> str:
    """``raw`` (the percent-encoded path after ``/llm/{llm_id}/``, no query) in normal form; see the module.

    :raises TapError: 400 ``invalid_path`` or ``path_outside_upstream``.
    """
    if _SUSPECT.search(raw) is None:
        return raw
    segments = _segments(raw)
    out: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if not out:
                raise path_outside_upstream(raw[:200])
            out.pop()
            continue
        out.append(segment)
    if segments[-1] in (".", "..") and out:
        out.append("")  # "a/b/.." is the directory "a/": RFC 3986 keeps the trailing slash
    return "/".join(out)


def plain_path(raw: str) -> None:
    """Refuse ``raw`` (a percent-encoded path) unless each segment is a plain name: no dot-segment in any spelling
    and nothing :func:`confined_path` refuses. For routes whose path parameters a handler may take for names
    (plugin endpoints): a parameter then never holds a decoded ``/``, ``..`` or ``\\``.

    :raises TapError: 400 ``invalid_path``.
    """
    if _SUSPECT.search(raw) is not None and any(s in (".", "..") for s in _segments(raw)):
        raise invalid_path(raw[:200], "a dot-segment")


def _segments(raw: str) -> list[str]:
    """The segments of ``raw`` with percent-encodings normalised; raises for what the module says is refused."""
    if _BAD_ESCAPE.search(raw):
        raise invalid_path(raw[:200], "a '%' that is not a percent-encoding")
    text = _ESCAPE.sub(_normal_escape, raw)
    if "\\" in text:
        raise invalid_path(raw[:200], "a backslash")
    if _HOSTILE_ESCAPE.search(text):
        raise invalid_path(raw[:200], "an encoded '/', '\\', control character or double encoding")
    if _CONTROL.search(text):
        raise invalid_path(raw[:200], "a control character")
    segments = text.split("/")
    for segment in segments[:-1]:
        if segment == "":
            raise invalid_path(raw[:200], "an empty segment ('//')")
    for segment in segments:
        if segment.startswith((".;", "..;")):
            raise invalid_path(raw[:200], "a dot-segment with a ';' parameter")
    return segments
