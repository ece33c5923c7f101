"""``tap.admin``: the admin HTTP API (apps, keys, budgets, plugin config) and the shared state it manages."""

from __future__ import annotations

import hashlib
import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway_tap.settings.apps import KEY_HASH
from gateway_tap.settings.base import Id, Section


class AdminListenSettings(Section):
    """Where the admin API listens: its own socket, never the proxy's."""

    host: str = Field(default="127.0.0.1", description="Interface to bind; keep it private (127.0.0.1 or an "
                                                         "internal network).")
    port: int = Field(default=8081, ge=1, le=65535, description="TCP port of the admin API.")


class AdminTokenSettings(Section):
    """One admin token: its id (who, in audit records), its role and its secret as a hash or an env variable."""

    id: Id = Field(description="Names the token in audit records and logs.")
    role: Literal["admin", "read"] = Field(default="admin",
                                           description="admin: every call; read: GET only (writes get 403).")
    token_hash: str | None = Field(default=None, description="'sha256:<hex>' of the token (gateway-tap hash-key).")
    token_env: str | None = Field(default=None, description="Environment variable holding the token itself.")

    @field_validator("token_hash")
    @classmethod
    def _check_hash(cls, value: str | None) -> str | None:
        if value is not None and not KEY_HASH.fullmatch(value):
            raise ValueError(f"{value[:12]!r}... is not 'sha256:' followed by 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> AdminTokenSettings:
        if (self.token_hash is None) == (self.token_env is None):
            raise ValueError("set exactly one of token_hash and token_env")
        return self

    def digest(self) -> str | None:
        """The token's ``sha256:<hex>`` (from the env variable when configured so; None when it is unset)."""
        if self.token_hash is not None:
            return self.token_hash
        token = os.environ.get(self.token_env or "", "")
        return "sha256:" + hashlib.sha256(token.encode()).hexdigest() if token else None


class AdminSettings(Section):
    """The admin API and the API-managed state (apps, keys, budgets, plugin configs) kept in the budget store's
    database, which every tap replica and worker polls and applies on top of this file."""

    listen: AdminListenSettings | None = Field(default=None,
                                               description="Serve the admin API here (off when unset).")
    sync: bool = Field(default=False, description="Apply the API-managed state even when this tap does not serve "
                                                  "the API (always on when listen is set).")
    tokens: list[AdminTokenSettings] = Field(default_factory=list, description="Who may call the admin API.")
    poll_interval_s: float = Field(default=0.25, gt=0, le=60,
                                   description="How often each worker checks the state's version row.")
    max_body_bytes: int = Field(default=64 * 1024, gt=0, description="Larger admin request bodies get 413.")
    allowed_plugins: list[str] = Field(
        default_factory=list,
        description="Plugin classes the API may add instances of ('module:Class' or entry point names), besides "
                    "the installed entry points of group gateway_tap.plugins and the classes this file's plugins "
                    "use. The API imports nothing else: an admin token never becomes code execution.")

    @property
    def enabled(self) -> bool:
        """True when this tap applies the API-managed state."""
        return self.sync or self.listen is not None

    def environment_problems(self) -> list[str]:
        """Tokens of a served API whose ``token_env`` is unset or empty, one ``key.path: message`` line each
        (``check-config`` and ``serve`` refuse to start with any: every call would get 401)."""
        if self.listen is None:
            return []
        return [f"tap.admin.tokens[{i}].token_env: ${t.token_env} is not set (or empty) in the environment; "
                f"export the admin token {t.id!r} there" for i, t in enumerate(self.tokens)
                if t.token_env is not None and not os.environ.get(t.token_env)]

    @model_validator(mode="after")
    def _tokens_when_listening(self) -> AdminSettings:
        if self.listen is not None and not self.tokens:
            raise ValueError("tap.admin.listen is set but no tokens are configured")
        ids = [t.id for t in self.tokens]
        if len(set(ids)) != len(ids):
            raise ValueError("token ids must be unique")
        return self
