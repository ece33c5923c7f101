"""The API-managed state as the taps apply it: apps, keys, budgets and plugin configs on top of the YAML file."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway_tap.settings import AppConfig, BudgetSettings, GatewayConfig

log = logging.getLogger("gateway_tap.admin")

KEY_PREFIX_CHARS = 10
"""Characters of an issued key shown for identification (``gt-`` and 7 random ones)."""


def new_key() -> tuple[str, str, str]:
    """A fresh app key: ``(secret, sha256 hash, visible prefix)``. The secret is returned to the caller once."""
    secret = "gt-" + secrets.token_urlsafe(32)
    return secret, "sha256:" + hashlib.sha256(secret.encode()).hexdigest(), secret[:KEY_PREFIX_CHARS]


@dataclass(frozen=True, slots=True)
class ManagedApp:
    """An app created through the API."""

    id: str
    name: str
    allowed_llms: tuple[str, ...]
    metadata: Mapping[str, Any]
    enabled: bool
    created_s: float
    updated_s: float


@dataclass(frozen=True, slots=True)
class ManagedKey:
    """An issued key: only its hash and visible prefix are kept."""

    id: str
    app_id: str
    key_hash: str
    prefix: str
    created_s: float
    expires_s: float | None = None
    revoked_s: float | None = None
    last_used_s: float | None = None

    def state(self, now_s: float) -> str:
        """``active``, ``expiring`` (rotated, still valid until ``expires_s``), ``expired`` or ``revoked``."""
        if self.revoked_s is not None:
            return "revoked"
        if self.expires_s is not None:
            return "expiring" if now_s < self.expires_s else "expired"
        return "active"

    def valid(self, now_s: float) -> bool:
        return self.state(now_s) in ("active", "expiring")


@dataclass(frozen=True)
class AdminState:
    """One consistent read of the admin tables at ``version``."""

    version: int = 0
    apps: Mapping[str, ManagedApp] = field(default_factory=dict)
    keys: tuple[ManagedKey, ...] = ()
    budgets: tuple[BudgetSettings, ...] = ()
    plugin_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def next_expiry_s(self, now_s: float) -> float | None:
        """When the next rotated key stops being valid (the state must be applied again then)."""
        pending = [k.expires_s for k in self.keys
                   if k.revoked_s is None and k.expires_s is not None and k.expires_s > now_s]
        return min(pending, default=None)

    def overlay(self, config: GatewayConfig, now_s: float) -> GatewayConfig:
        """``config`` (the YAML file) plus this state: API apps with their valid keys (none when disabled), API
        budgets, API plugin configs. What the file declares wins a clash (the API refuses to create one, but
        the file may gain an id later); a clash is logged."""
        yaml_apps = {a.id for a in config.apps}
        hashes: dict[str, list[str]] = {}
        for key in self.keys:
            if key.valid(now_s):
                hashes.setdefault(key.app_id, []).append(key.key_hash)
        apps = list(config.apps)
        for app in self.apps.values():
            if app.id in yaml_apps:
                log.warning("API app %r is shadowed by the app of the same id in the file", app.id)
                continue
            apps.append(AppConfig(id=app.id, name=app.name, allowed_llms=list(app.allowed_llms),
                                  metadata=dict(app.metadata),
                                  key_hashes=hashes.get(app.id, []) if app.enabled else []))
        yaml_budgets = {b.key for b in config.budgets}
        budgets = list(config.budgets) + [b for b in self.budgets if b.key not in yaml_budgets]
        plugins = [p.model_copy(update={"config": dict(self.plugin_configs[p.name])})
                   if p.name in self.plugin_configs else p for p in config.plugins]
        return config.model_copy(update={"apps": apps, "budgets": budgets, "plugins": plugins})
