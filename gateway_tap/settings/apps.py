"""``apps``: the client applications and the (hashed) keys they authenticate with."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from gateway_tap.settings.base import ID_PATTERN, DisplayText, Id, Metadata, Section

KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
"""How a stored key looks: ``sha256:`` and 64 lowercase hex digits (``gateway-tap hash-key``)."""

KEY_HASH_ID_CHARS = len("sha256:") + 12
"""A key without an id of its own is named by ``sha256:`` and the first 12 hex digits of its hash."""
KEY_ID_PATTERN = rf"^(?:sha256:[0-9a-f]{{12}}|{ID_PATTERN[1:-1]})$"
"""A key's id as events and key budgets name it: an id (:data:`ID_PATTERN`), or ``sha256:`` and 12 hex digits."""
KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN)]


def default_key_id(key_hash: str) -> str:
    """The id of a key that has none of its own (``AppConfig.key_ids``): its hash's first 12 hex digits. Never
    the full hash: events and indices name keys by id."""
    return key_hash[:KEY_HASH_ID_CHARS]


class AppConfig(Section):
    """A client application and the keys it authenticates with."""

    id: Id = Field(description="Unique; the app_id of its events.")
    name: DisplayText = Field(default="", description="Display name (at most 200 characters, no control "
                                                              "characters).")
    key_hashes: list[str] = Field(default_factory=list,
                                  description="'sha256:<hex>' of each valid key (gateway-tap hash-key).")
    expired_key_hashes: list[str] = Field(
        default_factory=list,
        description="'sha256:<hex>' of keys that were valid and have expired: refused with 401 expired_api_key "
                    "(instead of invalid_api_key). The admin API fills it with its keys past their expiry.")
    key_ids: dict[str, Id] = Field(
        default_factory=dict,
        description="An id per key hash: how events (key_id) and key budgets (budgets[].key_id) name the key. A key "
                    "not listed is named 'sha256:' and the first 12 hex digits of its hash. Keys that share an id "
                    "share its budget (a key and its successor). The admin API fills it with its keys' ids.")
    allowed_llms: list[str] = Field(default_factory=lambda: ["*"], description="LLM ids, or '*' for all.")
    metadata: Metadata = Field(
        default_factory=dict,
        description="Free-form data about the app (team, tier, cost center, ...) for plugins and collectors: "
                    "services.gateway.get_app(app_id).metadata and a hook's ctx.app.metadata. Not for secrets. "
                    "JSON values, at most 8 levels deep and 8 KiB, no control characters.")

    @field_validator("key_hashes", "expired_key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not KEY_HASH.fullmatch(item):
                raise ValueError(f"{item[:12]!r}... is not 'sha256:' followed by 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _check_key_ids(self) -> AppConfig:
        known = {*self.key_hashes, *self.expired_key_hashes}
        for key_hash in self.key_ids:
            if key_hash not in known:
                raise ValueError(f"key_ids: {key_hash[:19]!r}... is not one of the app's key_hashes")
        return self

    def key_id(self, key_hash: str) -> str:
        """The id of the app's key ``key_hash`` (:attr:`key_ids`, else :func:`default_key_id`)."""
        return self.key_ids.get(key_hash) or default_key_id(key_hash)

    def all_key_ids(self) -> set[str]:
        """The ids of the app's keys (valid or expired)."""
        return {self.key_id(h) for h in (*self.key_hashes, *self.expired_key_hashes)}
