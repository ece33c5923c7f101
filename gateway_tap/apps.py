"""Apps and their keys: the sha256 key hash, the key a request presents, and the index the tap authenticates with."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from gateway_tap.settings import AppConfig


def hash_key(key: str) -> str:
    """``sha256:<hex>``, the form stored in an app's ``key_hashes``. A presented key is hashed as the bytes the
    client sent (aiohttp keeps a byte that is not UTF-8 as a lone surrogate): never an encoding error."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The app key from ``Authorization: Bearer`` or ``x-api-key``, or ``None``."""
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    value = headers.get("x-api-key")
    return value.strip() or None if value else None


class AppIndex:
    """Apps by id and by key hash (O(1) lookup; the final equality check is constant time)."""

    def __init__(self, apps: Iterable[AppConfig]) -> None:
        self.by_id: dict[str, AppConfig] = {}
        self.by_hash: dict[str, AppConfig] = {}
        self.key_ids: dict[str, str] = {}
        """The id of each valid key, by hash (:meth:`AppConfig.key_id`): what events and key budgets name it by."""
        self.expired: frozenset[str] = frozenset()
        expired: set[str] = set()
        for app in apps:
            self.by_id[app.id] = app
            for key_hash in app.key_hashes:
                self.by_hash[key_hash] = app
                self.key_ids[key_hash] = app.key_id(key_hash)
            expired.update(app.expired_key_hashes)
        self.expired = frozenset(expired - self.by_hash.keys())
        self._allowed = {app.id: frozenset(app.allowed_llms) for app in self.by_id.values()}
        self.used: set[str] = set()
        """Hashes of the keys that authenticated since the admin state last took them (a key's "last used")."""

    def app_for_key(self, key: str) -> AppConfig | None:
        found = self.identify(key)
        return found[0] if found is not None else None

    def identify(self, key: str) -> tuple[AppConfig, str, str] | None:
        """The app of ``key``, the key's ``sha256:<hex>`` (what identifies a key to rate limits) and its id (what
        events and key budgets name it by), or None."""
        digest = hash_key(key)
        app = self.by_hash.get(digest)
        if app is None:
            return None
        # The dict lookup already matched; compare again in constant time so the answer never depends on timing.
        if any(hmac.compare_digest(digest, h) for h in app.key_hashes):
            self.used.add(digest)
            return app, digest, self.key_ids[digest]
        return None

    def expired_key(self, key: str) -> bool:
        """Whether ``key`` (that did not authenticate) is one that expired (401 ``expired_api_key``)."""
        return bool(self.expired) and hash_key(key) in self.expired

    def allowed(self, app_id: str, llm_id: str) -> bool:
        allowed = self._allowed.get(app_id)
        return allowed is not None and ("*" in allowed or llm_id in allowed)
