"""``apps``: the client applications and the (hashed) keys they authenticate with."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from gateway_tap.settings.base import DisplayText, Id, Metadata, Section

KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")
"""How a stored key looks: ``sha256:`` and 64 lowercase hex digits (``gateway-tap hash-key``)."""


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
