"""The API-managed state as the taps apply it: apps, keys, budgets and plugins on top of the YAML file.

Each kind of entry is checked by one function (:func:`app_entry`, :func:`budget_entry` (a key's budgets too),
:func:`plugin_entry`, :func:`plugin_config_entry`, :func:`rate_limit_entry`, :func:`key_rate_limit_entry`) with the
models and cross-checks the YAML file goes through: the API calls it before it stores a change (422 naming the
field), and every worker calls it again when it applies the state
(:meth:`AdminState.overlay`). An entry that fails when applied is left out and reported as :class:`Rejected`
(``GET /v1/status``, a metric, a log line): one bad entry never blocks the others.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gateway_tap.plugins.loader import ENTRY_POINT_GROUP
from gateway_tap.settings import AppConfig, BudgetSettings, GatewayConfig, PluginConfig, RateLimitSettings
from gateway_tap.settings.apps import KEY_HASH
from gateway_tap.settings.base import key_path
from gateway_tap.settings.llms import unknown_llm_refs

KEY_PREFIX_CHARS = 10
"""Characters of an issued key shown for identification (``gt-`` and 7 random ones)."""

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


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
    name: str = ""
    rate_limits: Mapping[str, int] | None = None
    """The key's own limits (``requests_per_minute``, ``tokens_per_minute``, ``max_concurrent``)."""
    lineage_id: str | None = None
    """The id of the first key of its rotation chain (None: its own id); see :attr:`lineage`."""

    @property
    def lineage(self) -> str:
        """What events (``key_id``) and the key's budgets name it by: the id of the first key of its rotation chain,
        so a rotated key's successor keeps the key's budgets and spend."""
        return self.lineage_id or self.id

    def state(self, now_s: float) -> str:
        """``active``, ``expiring`` (issued with an expiry, or rotated: valid until ``expires_s``), ``expired`` or
        ``revoked``."""
        if self.revoked_s is not None:
            return "revoked"
        if self.expires_s is not None:
            return "expiring" if now_s < self.expires_s else "expired"
        return "active"

    def valid(self, now_s: float) -> bool:
        return self.state(now_s) in ("active", "expiring")


@dataclass(frozen=True, slots=True)
class Rejected:
    """An entry of the state a worker does not apply, and why. ``entry`` is its path in the API
    (``apps/team-a``, ``apps/team-a/keys/key_...``, ``apps/team-a/budgets/team-a/openai:daily``,
    ``plugins/guard`` for a plugin created through the API, ``plugins/guard/config`` for a file plugin's config)."""

    entry: str
    error: str


class EntryError(ValueError):
    """An entry the tap would not apply: ``message`` names the field, ``param`` is its key path (the API's 422
    ``param``), ``code`` the error code the API answers with."""

    def __init__(self, message: str, param: str | None = None, code: str = "validation_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def validated(model: type[M], data: Mapping[str, Any]) -> M:
    """``model`` from ``data``, or :class:`EntryError` listing every field that fails (``param``: the first)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [(key_path(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))),
                     e["msg"]) for e in exc.errors()]
        raise EntryError("; ".join(f"{path}: {msg}" for path, msg in problems), problems[0][0]) from None


def _known_llms(ids: Sequence[str], llm_ids: Collection[str], param: str) -> None:
    for i, llm_id in unknown_llm_refs(ids, llm_ids):
        raise EntryError(f"{param}[{i}]: unknown LLM {llm_id!r}", f"{param}[{i}]", "unknown_llm")


def app_entry(app: ManagedApp, key_hashes: Sequence[str], llm_ids: Collection[str],
              expired_key_hashes: Sequence[str] = (), key_ids: Mapping[str, str] | None = None) -> AppConfig:
    """The app as the tap applies it (its model and its LLM references, as the file's apps are checked); ``key_ids``
    names its keys (by hash) for events and key budgets (:attr:`ManagedKey.lineage`)."""
    _known_llms(app.allowed_llms, llm_ids, "allowed_llms")
    return validated(AppConfig, {"id": app.id, "name": app.name, "allowed_llms": list(app.allowed_llms),
                                 "metadata": dict(app.metadata), "key_hashes": list(key_hashes),
                                 "expired_key_hashes": list(expired_key_hashes), "key_ids": dict(key_ids or {})})


def rate_limit_entry(limit: RateLimitSettings, app_ids: Collection[str], llm_ids: Collection[str]) -> None:
    """An app's rate limits' references, as the file's are checked (``check_rate_limit_references``)."""
    if limit.app_id not in app_ids:
        raise EntryError(f"app_id: unknown app {limit.app_id!r}", "app_id", "not_found")
    if limit.llm_id is not None:
        _known_llms([limit.llm_id], llm_ids, "llm_id")


KEY_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent")


def key_rate_limit_entry(key_hash: str, limits: Mapping[str, Any]) -> RateLimitSettings:
    """A key's own limits as the tap applies them: the ``rate_limits`` entry of scope ``key=<its hash>``."""
    unknown = sorted(set(limits) - set(KEY_LIMIT_FIELDS))
    if unknown:
        raise EntryError(f"rate_limits.{unknown[0]}: not a key limit ({', '.join(KEY_LIMIT_FIELDS)})",
                         f"rate_limits.{unknown[0]}")
    try:
        return validated(RateLimitSettings, {"key_id": key_hash, **limits})
    except EntryError as exc:
        raise EntryError(f"rate_limits: {exc.message}", f"rate_limits.{exc.param}") from None


def budget_entry(budget: BudgetSettings, app_ids: Collection[str], llm_ids: Collection[str],
                 key_ids: Mapping[str, Collection[str]] | None = None) -> None:
    """A budget's references: an app that exists here, an LLM the file declares, and for a key's budget a key of
    that app (``key_ids``: the key ids of each app, :attr:`ManagedKey.lineage`)."""
    if budget.app_id not in app_ids:
        raise EntryError(f"app_id: unknown app {budget.app_id!r}", "app_id", "not_found")
    if budget.llm_id is not None:
        _known_llms([budget.llm_id], llm_ids, "llm_id")
    if budget.key_id is not None and budget.key_id not in (key_ids or {}).get(budget.app_id, ()):
        raise EntryError(f"key_id: app {budget.app_id!r} has no key {budget.key_id!r}", "key_id", "not_found")


def budget_entry_path(budget: BudgetSettings) -> str:
    """A budget's entry in the API (``Rejected.entry``, audit targets): ``apps/<app>/budgets/<key>``, a key's
    ``apps/<app>/keys/<key id>/budgets/<key>``."""
    if budget.key_id is not None:
        return f"apps/{budget.app_id}/keys/{budget.key_id}/budgets/{budget.key}"
    return f"apps/{budget.app_id}/budgets/{budget.key}"


def plugin_allowed(use: str, file: GatewayConfig) -> bool:
    """May the API name ``use``? Only what the operator allowed: ``tap.admin.allowed_plugins``, a class the file's
    plugins already use, or an installed entry point of group ``gateway_tap.plugins`` (its metadata is read;
    nothing is imported to answer)."""
    if use in file.tap.admin.allowed_plugins or any(p.use == use for p in file.plugins):
        return True
    return ":" not in use and bool(entry_points(group=ENTRY_POINT_GROUP, name=use))


def plugin_entry(plugin: PluginConfig, file: GatewayConfig) -> None:
    """A plugin created through the API: its name is free, its class allowed, its LLMs declared. (The plugin's
    own checks, schema and ``initialize``, run when it is loaded: :func:`gateway_tap.plugins.loader.trial_plugin`.)"""
    if any(p.name == plugin.name for p in file.plugins):
        raise EntryError(f"name: plugin {plugin.name!r} is declared in the configuration file", "name",
                         "declared_in_file")
    if not plugin_allowed(plugin.use, file):
        raise EntryError(f"use: {plugin.use!r} is not a plugin the operator allowed: an installed entry point of group "
                         f"{ENTRY_POINT_GROUP}, a class the file's plugins use, or one listed in "
                         "tap.admin.allowed_plugins", "use", "plugin_not_allowed")
    _known_llms(plugin.llms, {llm.id for llm in file.llms}, "llms")


def plugin_config_entry(name: str, config: Mapping[str, Any], file: GatewayConfig) -> PluginConfig:
    """The file's plugin ``name`` with ``config`` instead of its own."""
    for plugin in file.plugins:
        if plugin.name == name:
            return validated(PluginConfig, {**plugin.model_dump(), "config": dict(config)})
    raise EntryError(f"no plugin {name!r} in the configuration file", None, "not_found")


class CheckedEntries:
    """What the last overlay built from each entry, with the inputs it was built from: the next overlay rebuilds
    only entries whose inputs changed (a key issued re-checks its one app, not ten thousand). Entries that fail
    are not kept (they are rare and checked again). One overlay at a time uses it."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[tuple[Any, ...], Any]] = {}
        self._next: dict[tuple[str, str], tuple[tuple[Any, ...], Any]] = {}

    def get(self, kind: str, name: str, build: Callable[..., T], *inputs: Any) -> T:
        """``build(*inputs)``, or what it returned last time for entry ``(kind, name)`` if ``inputs`` are equal."""
        entry = (kind, name)
        last = self._last.get(entry)
        result: T = last[1] if last is not None and last[0] == inputs else build(*inputs)
        self._next[entry] = (inputs, result)
        return result

    def done(self) -> None:
        """The overlay is complete: keep what it used (entries gone from the state are forgotten)."""
        self._last, self._next = self._next, {}


@dataclass(frozen=True)
class Overlay:
    """The file's configuration with the state on top, and the entries left out."""

    config: GatewayConfig
    rejected: tuple[Rejected, ...] = ()


@dataclass(frozen=True)
class AdminState:
    """One consistent read of the admin tables at ``version``. ``unreadable`` lists rows that do not even parse
    (written by another version, or by hand); they are reported like any entry that cannot be applied."""

    version: int = 0
    apps: Mapping[str, ManagedApp] = field(default_factory=dict)
    keys: tuple[ManagedKey, ...] = ()
    budgets: tuple[BudgetSettings, ...] = ()
    """API budgets: apps' and keys' (``key_id`` set: a key's lineage id)."""
    plugin_configs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    plugins: Mapping[str, PluginConfig] = field(default_factory=dict)
    """Plugins created through the API, by name, in creation order."""
    unreadable: tuple[Rejected, ...] = ()
    rate_limits: tuple[RateLimitSettings, ...] = ()
    """API apps' rate limits (a key's own are on the key)."""

    def next_expiry_s(self, now_s: float) -> float | None:
        """When the next rotated key stops being valid (the state must be applied again then)."""
        pending = [k.expires_s for k in self.keys
                   if k.revoked_s is None and k.expires_s is not None and k.expires_s > now_s]
        return min(pending, default=None)

    def overlay(self, config: GatewayConfig, now_s: float,
                pinned: Mapping[str, PluginConfig | None] | None = None,
                checked: CheckedEntries | None = None) -> Overlay:
        """``config`` (the YAML file) plus this state: API apps with their valid keys (none when disabled), API
        budgets, API plugins and API plugin configs, each checked as the API checks it; what fails is left out
        and listed in :attr:`Overlay.rejected`. The file wins a clash (the API refuses to create one, but the
        file may gain an id later).

        :param pinned: plugins that failed to load with their state entry (:mod:`gateway_tap.proxy.admin_link`):
            the settings to run instead (what runs now), or None for the file's entry (none for an API plugin).
        :param checked: the entries the previous overlay built: those whose inputs did not change are reused (at
            ten thousand apps, checking every app again took most of a second).
        """
        pinned = pinned or {}
        checked = checked or CheckedEntries()
        rejected = list(self.unreadable)
        llm_ids = {llm.id for llm in config.llms}
        hashes: dict[str, list[str]] = {}
        expired: dict[str, list[str]] = {}
        key_ids: dict[str, dict[str, str]] = {}  # per app: key hash -> lineage id
        lineages: dict[str, set[str]] = {}  # per app: every key's lineage id (a revoked key's budget is harmless)
        key_limits: list[RateLimitSettings] = []
        for key in self.keys:
            if KEY_HASH.fullmatch(key.key_hash) is None:
                rejected.append(Rejected(f"apps/{key.app_id}/keys/{key.id}", "key_hash is not a sha256 hash"))
                continue
            lineages.setdefault(key.app_id, set()).add(key.lineage)
            key_ids.setdefault(key.app_id, {})[key.key_hash] = key.lineage
            if key.state(now_s) == "expired":
                expired.setdefault(key.app_id, []).append(key.key_hash)
            if not key.valid(now_s):
                continue
            if key.rate_limits:
                try:
                    key_limits.append(checked.get("key_limits", key.id, key_rate_limit_entry, key.key_hash,
                                                  key.rate_limits))
                except EntryError as exc:
                    rejected.append(Rejected(f"apps/{key.app_id}/keys/{key.id}/rate_limits", str(exc)))
                    continue
            hashes.setdefault(key.app_id, []).append(key.key_hash)
        apps = list(config.apps)
        app_ids = {a.id for a in config.apps}
        for app in self.apps.values():
            entry = f"apps/{app.id}"
            if app.id in app_ids:
                rejected.append(Rejected(entry, "shadowed by the app of the same id in the configuration file"))
                continue
            key_hashes, expired_hashes = hashes.get(app.id, []) if app.enabled else [], expired.get(app.id, [])
            try:
                named = {*key_hashes, *expired_hashes}
                ids = {h: i for h, i in key_ids.get(app.id, {}).items() if h in named}
                apps.append(checked.get("app", app.id, app_entry, app, key_hashes, llm_ids, expired_hashes, ids))
            except EntryError as exc:
                rejected.append(Rejected(entry, str(exc)))
                continue
            app_ids.add(app.id)
        yaml_budgets = {b.key for b in config.budgets}
        budgets = list(config.budgets)
        for budget in self.budgets:
            entry = budget_entry_path(budget)
            try:
                if budget.key in yaml_budgets:
                    raise EntryError("shadowed by the budget of the configuration file")
                budget_entry(budget, app_ids, llm_ids, lineages)
            except EntryError as exc:
                rejected.append(Rejected(entry, str(exc)))
                continue
            budgets.append(budget)
        plugins: list[PluginConfig] = []
        for plugin in config.plugins:
            if plugin.name in self.plugin_configs and plugin.name not in pinned:
                try:
                    plugin = plugin_config_entry(plugin.name, self.plugin_configs[plugin.name], config)
                except EntryError as exc:
                    rejected.append(Rejected(f"plugins/{plugin.name}/config", str(exc)))
            plugins.append(pinned.get(plugin.name) or plugin)
        for plugin in self.plugins.values():
            if plugin.name in pinned:
                kept = pinned[plugin.name]
                if kept is not None and all(p.name != plugin.name for p in config.plugins):
                    plugins.append(kept)
                continue
            try:
                plugin_entry(plugin, config)
            except EntryError as exc:
                rejected.append(Rejected(f"plugins/{plugin.name}", str(exc)))
                continue
            plugins.append(plugin)
        yaml_limits = {r.scope for r in config.rate_limits}
        rate_limits = list(config.rate_limits)
        for limit in self.rate_limits:
            entry = f"apps/{limit.app_id}/rate_limits/{limit.scope}"
            try:
                if limit.scope in yaml_limits:
                    raise EntryError("shadowed by the rate limits of the configuration file")
                rate_limit_entry(limit, app_ids, llm_ids)
            except EntryError as exc:
                rejected.append(Rejected(entry, str(exc)))
                continue
            rate_limits.append(limit)
        rate_limits += [k for k in key_limits if k.scope not in yaml_limits]
        merged = config.model_copy(update={"apps": apps, "budgets": budgets, "plugins": plugins,
                                           "rate_limits": rate_limits})
        checked.done()
        return Overlay(merged, tuple(sorted(rejected, key=lambda r: r.entry)))
