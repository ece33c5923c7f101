"""Reads and changes of the admin state; every change is one transaction that also bumps the version row."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import orjson

from gateway_tap.admin import budget_rows
from gateway_tap.admin.db import Database, Tx, is_unique_violation
from gateway_tap.admin.state import AdminState, ManagedApp, ManagedKey, Rejected, new_key
from gateway_tap.budgets.store import BudgetStoreError
from gateway_tap.settings import BudgetSettings, PluginConfig, RateLimitSettings

T = TypeVar("T")

_APP_COLUMNS = "id, name, allowed_llms, metadata, enabled, created_s, updated_s"
_KEY_COLUMNS = ("id, app_id, key_hash, prefix, created_s, expires_s, revoked_s, last_used_s, name, rate_limits, "
                "lineage_id")


class NotFound(LookupError):
    """The app, key, budget or plugin named does not exist (404)."""


class Conflict(ValueError):
    """The change clashes with what exists (409)."""


@dataclass(frozen=True)
class TapVersion:
    """What one tap worker last reported: the state version it runs and the entries it could not apply."""

    gateway_id: str
    worker: int
    pid: int
    version: int
    seen_s: float
    rejected: tuple[Rejected, ...] = ()


def _app(row: tuple[Any, ...]) -> ManagedApp:
    return ManagedApp(row[0], row[1], tuple(orjson.loads(row[2])), orjson.loads(row[3]), bool(row[4]), row[5],
                      row[6])


def _key(row: tuple[Any, ...]) -> ManagedKey:
    return ManagedKey(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8] or "",
                      orjson.loads(row[9]) if row[9] else None, row[10])


def _parsed(rows: list[tuple[Any, ...]], parse: Callable[[tuple[Any, ...]], T], entry: Callable[[tuple[Any, ...]], str],
            unreadable: list[Rejected]) -> list[T]:
    """Each row parsed; a row that does not parse (another version wrote it, or a person) is reported, not fatal."""
    out = []
    for row in rows:
        try:
            out.append(parse(row))
        except (ValueError, TypeError, KeyError) as exc:  # orjson's and pydantic's errors are ValueErrors
            unreadable.append(Rejected(entry(row), f"unreadable row: {str(exc).splitlines()[0][:200]}"))
    return out


def app_view(app: ManagedApp) -> dict[str, Any]:
    """An app as audit records show it."""
    data = asdict(app)
    data["allowed_llms"] = list(app.allowed_llms)
    data["metadata"] = dict(app.metadata)
    return data


def key_view(key: ManagedKey) -> dict[str, Any]:
    """A key as audit records show it: never its hash (nor, of course, the secret)."""
    data = asdict(key)
    del data["key_hash"]
    return data


def _rejected(text: str) -> tuple[Rejected, ...]:
    try:
        return tuple(Rejected(str(r["entry"]), str(r["error"])) for r in orjson.loads(text))
    except (ValueError, TypeError, KeyError):
        return (Rejected("(report)", "unreadable"),)


@dataclass(frozen=True)
class _StateRows:
    """The rows of one read of the state, by table."""

    apps: list[tuple[Any, ...]]
    keys: list[tuple[Any, ...]]
    budgets: list[tuple[Any, ...]]
    plugin_configs: list[tuple[Any, ...]]
    plugins: list[tuple[Any, ...]]
    rate_limits: list[tuple[Any, ...]]
    key_budgets: list[tuple[Any, ...]]

    def state(self, version: int) -> AdminState:
        unreadable: list[Rejected] = []
        apps = _parsed(self.apps, _app, lambda r: f"apps/{r[0]}", unreadable)
        keys = [_key(r) for r in self.keys]
        budgets = _parsed(self.budgets, budget_rows.app_budget, budget_rows.app_budget_entry, unreadable)
        budgets += _parsed(self.key_budgets, budget_rows.key_budget, budget_rows.key_budget_entry, unreadable)
        configs = _parsed(self.plugin_configs, lambda r: (r[0], _object(r[1])), lambda r: f"plugins/{r[0]}/config",
                          unreadable)
        plugins = _parsed(self.plugins, lambda r: PluginConfig.model_validate_json(r[0]), lambda r: f"plugins/{r[1]}",
                          unreadable)
        limits = _parsed(self.rate_limits, lambda r: RateLimitSettings.model_validate_json(r[0]),
                         lambda r: f"apps/{r[1]}/rate_limits/{r[2]}", unreadable)
        return AdminState(version, {a.id: a for a in apps}, tuple(keys), tuple(budgets), dict(configs),
                          {p.name: p for p in plugins}, tuple(unreadable), tuple(limits))


class AdminStore:
    """The admin tables of the budget store's database (:mod:`gateway_tap.admin.db`).

    Methods raise :class:`NotFound`, :class:`Conflict`, and the budget store's
    :class:`~gateway_tap.budgets.store.StoreUnavailable` / ``BudgetStoreError``.
    """

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    async def close(self) -> None:
        await self.db.close()

    # -- reads -----------------------------------------------------------------------------------------------

    async def version(self) -> int:
        """The state's version (0 before the first change): what the taps poll."""
        async with self.db.transaction(write=False) as tx:
            row = await tx.fetchone("SELECT version FROM admin_state WHERE id = 1")
        return int(row[0]) if row else 0

    async def state(self) -> AdminState:
        """Everything, read in one transaction (and parsed in a thread: tens of thousands of keys take a while)."""
        async with self.db.transaction(write=False) as tx:
            row = await tx.fetchone("SELECT version FROM admin_state WHERE id = 1")
            rows = _StateRows(
                await tx.fetch(f"SELECT {_APP_COLUMNS} FROM admin_apps ORDER BY id"),
                await tx.fetch(f"SELECT {_KEY_COLUMNS} FROM admin_keys ORDER BY created_s, id"),
                await tx.fetch(budget_rows.APP_BUDGETS),
                await tx.fetch("SELECT name, config FROM admin_plugin_configs ORDER BY name"),
                await tx.fetch("SELECT settings, name FROM admin_plugins ORDER BY created_s, name"),
                await tx.fetch("SELECT settings, app_id, scope FROM admin_rate_limits ORDER BY scope"),
                await tx.fetch(budget_rows.KEY_BUDGETS))
        return await asyncio.to_thread(rows.state, int(row[0]) if row else 0)

    async def taps(self) -> list[TapVersion]:
        """The version each tap worker last reported, newest report first."""
        async with self.db.transaction(write=False) as tx:
            rows = await tx.fetch("SELECT gateway_id, worker, pid, version, seen_s, rejected FROM admin_taps "
                                  "ORDER BY seen_s DESC")
        return [TapVersion(r[0], r[1], r[2], r[3], r[4], _rejected(r[5])) for r in rows]

    # -- changes ---------------------------------------------------------------------------------------------

    async def _change(self, fn: Callable[[Tx], Awaitable[T]]) -> tuple[T, int]:
        """Run ``fn`` and bump the version in one transaction; returns ``fn``'s result and the new version."""
        try:
            async with self.db.transaction() as tx:
                result = await fn(tx)
                await tx.execute("UPDATE admin_state SET version = version + 1 WHERE id = 1")
                row = await tx.fetchone("SELECT version FROM admin_state WHERE id = 1")
        except BudgetStoreError as exc:
            if is_unique_violation(exc):
                raise Conflict("it already exists") from exc
            raise
        assert row is not None
        return result, int(row[0])

    @staticmethod
    async def _get_app(tx: Tx, app_id: str) -> ManagedApp:
        row = await tx.fetchone(f"SELECT {_APP_COLUMNS} FROM admin_apps WHERE id = ?", app_id)
        if row is None:
            raise NotFound(f"no API-managed app {app_id!r}")
        return _app(row)

    async def create_app(self, app_id: str, name: str, allowed_llms: list[str], metadata: Mapping[str, Any],
                         enabled: bool = True) -> tuple[ManagedApp, int]:
        now = self.clock()
        app = ManagedApp(app_id, name, tuple(allowed_llms), dict(metadata), enabled, now, now)

        async def run(tx: Tx) -> ManagedApp:
            if await tx.fetchone("SELECT 1 FROM admin_apps WHERE id = ?", app_id) is not None:
                raise Conflict(f"app {app_id!r} already exists")
            await tx.execute(f"INSERT INTO admin_apps ({_APP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             app_id, name, orjson.dumps(allowed_llms).decode(), orjson.dumps(metadata).decode(),
                             int(enabled), now, now)
            return app

        return await self._change(run)

    async def update_app(self, app_id: str, changes: Mapping[str, Any]) -> tuple[tuple[ManagedApp, ManagedApp], int]:
        """Apply ``changes`` (name, allowed_llms, metadata, enabled); returns (before, after)."""

        async def run(tx: Tx) -> tuple[ManagedApp, ManagedApp]:
            before = await self._get_app(tx, app_id)
            after = ManagedApp(
                app_id, changes.get("name", before.name), tuple(changes.get("allowed_llms", before.allowed_llms)),
                dict(changes.get("metadata", before.metadata)), bool(changes.get("enabled", before.enabled)),
                before.created_s, self.clock())
            await tx.execute("UPDATE admin_apps SET name = ?, allowed_llms = ?, metadata = ?, enabled = ?, "
                             "updated_s = ? WHERE id = ?", after.name, orjson.dumps(list(after.allowed_llms)).decode(),
                             orjson.dumps(dict(after.metadata)).decode(), int(after.enabled), after.updated_s, app_id)
            return before, after

        return await self._change(run)

    async def delete_app(self, app_id: str) -> tuple[ManagedApp, int]:
        """Delete the app with its keys and budgets."""

        async def run(tx: Tx) -> ManagedApp:
            before = await self._get_app(tx, app_id)
            await tx.execute("DELETE FROM admin_keys WHERE app_id = ?", app_id)
            await tx.execute("DELETE FROM admin_budgets WHERE app_id = ?", app_id)
            await tx.execute("DELETE FROM admin_key_budgets WHERE app_id = ?", app_id)
            await tx.execute("DELETE FROM admin_apps WHERE id = ?", app_id)
            return before

        return await self._change(run)

    async def issue_key(self, app_id: str, *, name: str = "", expires_s: float | None = None,
                        rate_limits: Mapping[str, int] | None = None) -> tuple[tuple[ManagedKey, str], int]:
        """A new key for the app (with an optional name, expiry and own rate limits): (the stored key, the secret
        to return once)."""

        async def run(tx: Tx) -> tuple[ManagedKey, str]:
            await self._get_app(tx, app_id)
            return await self._insert_key(tx, app_id, name, expires_s, rate_limits)

        return await self._change(run)

    async def _insert_key(self, tx: Tx, app_id: str, name: str = "", expires_s: float | None = None,
                          rate_limits: Mapping[str, int] | None = None,
                          lineage_id: str | None = None) -> tuple[ManagedKey, str]:
        secret, digest, prefix = new_key()
        key = ManagedKey("key_" + secrets.token_hex(8), app_id, digest, prefix, self.clock(), expires_s,
                         name=name, rate_limits=dict(rate_limits) if rate_limits else None, lineage_id=lineage_id)
        await tx.execute(f"INSERT INTO admin_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         key.id, key.app_id, key.key_hash, key.prefix, key.created_s, expires_s, None, None, name,
                         orjson.dumps(key.rate_limits).decode() if key.rate_limits else None, lineage_id)
        return key, secret

    async def update_key(self, app_id: str, key_id: str, changes: Mapping[str, Any]) -> tuple[
            tuple[ManagedKey, ManagedKey], int]:
        """Change a key's ``name``, ``expires_s`` or ``rate_limits`` (None: none); returns (before, after)."""

        async def run(tx: Tx) -> tuple[ManagedKey, ManagedKey]:
            before = await self._get_key(tx, app_id, key_id)
            after = ManagedKey(**{**asdict(before), **changes})
            await tx.execute("UPDATE admin_keys SET name = ?, expires_s = ?, rate_limits = ? WHERE id = ?",
                             after.name, after.expires_s,
                             orjson.dumps(after.rate_limits).decode() if after.rate_limits else None, key_id)
            return before, after

        return await self._change(run)

    async def set_rate_limit(self, limit: RateLimitSettings) -> tuple[RateLimitSettings, int]:
        """Create or replace an API app's rate limits of ``limit.scope``."""

        async def run(tx: Tx) -> RateLimitSettings:
            assert limit.app_id is not None
            await self._get_app(tx, limit.app_id)
            await tx.execute("DELETE FROM admin_rate_limits WHERE scope = ?", limit.scope)
            await tx.execute("INSERT INTO admin_rate_limits (scope, app_id, settings, updated_s) VALUES (?, ?, ?, ?)",
                             limit.scope, limit.app_id, limit.model_dump_json(exclude_none=True), self.clock())
            return limit

        return await self._change(run)

    async def delete_rate_limit(self, app_id: str, scope: str) -> tuple[None, int]:
        """Delete an API app's rate limits of ``scope``."""

        async def run(tx: Tx) -> None:
            row = await tx.fetchone("SELECT scope FROM admin_rate_limits WHERE scope = ? AND app_id = ?", scope,
                                    app_id)
            if row is None:
                raise NotFound(f"app {app_id!r} has no rate limits for {scope}")
            await tx.execute("DELETE FROM admin_rate_limits WHERE scope = ?", scope)

        return await self._change(run)

    @staticmethod
    async def _get_key(tx: Tx, app_id: str, key_id: str) -> ManagedKey:
        row = await tx.fetchone(f"SELECT {_KEY_COLUMNS} FROM admin_keys WHERE id = ? AND app_id = ?", key_id, app_id)
        if row is None:
            raise NotFound(f"app {app_id!r} has no key {key_id!r}")
        return _key(row)

    async def revoke_key(self, app_id: str, key_id: str) -> tuple[tuple[ManagedKey, ManagedKey], int]:
        """Revoke at once; returns (before, after). Revoking a revoked key is a conflict."""

        async def run(tx: Tx) -> tuple[ManagedKey, ManagedKey]:
            before = await self._get_key(tx, app_id, key_id)
            if before.revoked_s is not None:
                raise Conflict(f"key {key_id!r} is already revoked")
            now = self.clock()
            await tx.execute("UPDATE admin_keys SET revoked_s = ? WHERE id = ?", now, key_id)
            return before, ManagedKey(**{**asdict(before), "revoked_s": now})

        return await self._change(run)

    async def rotate_key(self, app_id: str, key_id: str, overlap_s: float) -> tuple[tuple[ManagedKey, ManagedKey,
                                                                                          str], int]:
        """Issue a successor and let the old key expire ``overlap_s`` from now: (old after, new, new secret)."""

        async def run(tx: Tx) -> tuple[ManagedKey, ManagedKey, str]:
            old = await self._get_key(tx, app_id, key_id)
            if not old.valid(self.clock()):
                raise Conflict(f"key {key_id!r} is {old.state(self.clock())}; issue a new key instead")
            expires = self.clock() + overlap_s
            if old.expires_s is not None:
                expires = min(expires, old.expires_s)
            await tx.execute("UPDATE admin_keys SET expires_s = ? WHERE id = ?", expires, key_id)
            # Its successor: the same name and limits, and the same lineage, so the key's budgets and spend go on.
            new, secret = await self._insert_key(tx, app_id, old.name, None, old.rate_limits, old.lineage)
            return ManagedKey(**{**asdict(old), "expires_s": expires}), new, secret

        return await self._change(run)

    async def keys(self, app_id: str) -> list[ManagedKey]:
        async with self.db.transaction(write=False) as tx:
            await self._get_app(tx, app_id)
            rows = await tx.fetch(f"SELECT {_KEY_COLUMNS} FROM admin_keys WHERE app_id = ? ORDER BY created_s, id",
                                  app_id)
        return [_key(r) for r in rows]

    async def set_budget(self, budget: BudgetSettings) -> tuple[BudgetSettings | None, int]:
        """Create or replace the budget of (app, LLM, period), or of (app, key, LLM, period) when ``budget.key_id``
        is set (the key's lineage id: :attr:`ManagedKey.lineage`); returns the one it replaced."""

        async def run(tx: Tx) -> BudgetSettings | None:
            await self._get_app(tx, budget.app_id)
            llm = budget.llm_id or ""
            if budget.key_id is None:
                row = await tx.fetchone("SELECT settings FROM admin_budgets WHERE app_id = ? AND llm_id = ? "
                                        "AND period = ?", budget.app_id, llm, budget.period)
                await tx.execute(
                    "INSERT INTO admin_budgets (app_id, llm_id, period, settings, updated_s) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (app_id, llm_id, period) DO UPDATE SET settings = excluded.settings, "
                    "updated_s = excluded.updated_s",
                    budget.app_id, llm, budget.period, budget.model_dump_json(), self.clock())
                return BudgetSettings.model_validate_json(row[0]) if row else None
            row = await tx.fetchone("SELECT settings FROM admin_key_budgets WHERE app_id = ? AND key_id = ? "
                                    "AND llm_id = ? AND period = ?", budget.app_id, budget.key_id, llm, budget.period)
            await tx.execute(
                "INSERT INTO admin_key_budgets (app_id, key_id, llm_id, period, settings, updated_s) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (app_id, key_id, llm_id, period) DO UPDATE SET "
                "settings = excluded.settings, updated_s = excluded.updated_s",
                budget.app_id, budget.key_id, llm, budget.period, budget.model_dump_json(), self.clock())
            return BudgetSettings.model_validate_json(row[0]) if row else None

        return await self._change(run)

    async def delete_budget(self, app_id: str, llm_id: str | None, period: str,
                            key_id: str | None = None) -> tuple[BudgetSettings, int]:
        """Delete the app's budget of (LLM, period), or its key ``key_id``'s (a lineage id)."""
        table, where, args = (("admin_budgets", "", ()) if key_id is None
                              else ("admin_key_budgets", " AND key_id = ?", (key_id,)))

        async def run(tx: Tx) -> BudgetSettings:
            row = await tx.fetchone(f"SELECT settings FROM {table} WHERE app_id = ? AND llm_id = ? AND period = ?"
                                    f"{where}", app_id, llm_id or "", period, *args)
            if row is None:
                scope = (f"key {key_id!r} of app {app_id!r}" if key_id else f"app {app_id!r}") + (
                    f" x LLM {llm_id!r}" if llm_id else "")
                raise NotFound(f"no API-managed {period} budget for {scope}")
            await tx.execute(f"DELETE FROM {table} WHERE app_id = ? AND llm_id = ? AND period = ?{where}",
                             app_id, llm_id or "", period, *args)
            return BudgetSettings.model_validate_json(row[0])

        return await self._change(run)

    async def set_plugin_config(self, name: str, config: Mapping[str, Any]) -> tuple[Mapping[str, Any] | None, int]:
        """Replace a plugin's config; returns the API config it replaced (None: the file's was in force)."""

        async def run(tx: Tx) -> Mapping[str, Any] | None:
            row = await tx.fetchone("SELECT config FROM admin_plugin_configs WHERE name = ?", name)
            await tx.execute(
                "INSERT INTO admin_plugin_configs (name, config, updated_s) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET config = excluded.config, updated_s = excluded.updated_s",
                name, orjson.dumps(dict(config)).decode(), self.clock())
            return orjson.loads(row[0]) if row else None

        return await self._change(run)

    async def delete_plugin_config(self, name: str) -> tuple[Mapping[str, Any], int]:
        """Back to the file's config for ``name``."""

        async def run(tx: Tx) -> Mapping[str, Any]:
            row = await tx.fetchone("SELECT config FROM admin_plugin_configs WHERE name = ?", name)
            if row is None:
                raise NotFound(f"plugin {name!r} has no API-managed config")
            await tx.execute("DELETE FROM admin_plugin_configs WHERE name = ?", name)
            loaded: Mapping[str, Any] = orjson.loads(row[0])
            return loaded

        return await self._change(run)

    async def create_plugin(self, plugin: PluginConfig) -> tuple[PluginConfig, int]:
        """Add a plugin (a whole ``plugins[]`` entry) created through the API."""

        async def run(tx: Tx) -> PluginConfig:
            if await tx.fetchone("SELECT 1 FROM admin_plugins WHERE name = ?", plugin.name) is not None:
                raise Conflict(f"plugin {plugin.name!r} already exists")
            now = self.clock()
            await tx.execute("INSERT INTO admin_plugins (name, settings, created_s, updated_s) VALUES (?, ?, ?, ?)",
                             plugin.name, plugin.model_dump_json(), now, now)
            return plugin

        return await self._change(run)

    async def replace_plugin(self, plugin: PluginConfig, expected: PluginConfig) -> tuple[PluginConfig, int]:
        """Replace an API plugin's entry, provided it still is ``expected`` (what the change was validated
        against; otherwise :class:`Conflict`: another change came first). Returns the replaced entry."""

        async def run(tx: Tx) -> PluginConfig:
            row = await tx.fetchone("SELECT settings FROM admin_plugins WHERE name = ?", plugin.name)
            if row is None:
                raise NotFound(f"no API-managed plugin {plugin.name!r}")
            if PluginConfig.model_validate_json(row[0]) != expected:
                raise Conflict(f"plugin {plugin.name!r} changed meanwhile; read it again and retry")
            await tx.execute("UPDATE admin_plugins SET settings = ?, updated_s = ? WHERE name = ?",
                             plugin.model_dump_json(), self.clock(), plugin.name)
            return expected

        return await self._change(run)

    async def delete_plugin(self, name: str) -> tuple[Mapping[str, Any], int]:
        """Remove an API plugin; returns its entry as stored."""

        async def run(tx: Tx) -> Mapping[str, Any]:
            row = await tx.fetchone("SELECT settings FROM admin_plugins WHERE name = ?", name)
            if row is None:
                raise NotFound(f"no API-managed plugin {name!r}")
            await tx.execute("DELETE FROM admin_plugins WHERE name = ?", name)
            return _object(row[0])

        return await self._change(run)

    # -- what taps report ------------------------------------------------------------------------------------

    async def mark_used(self, key_hashes: set[str], at_s: float) -> None:
        """Record that these keys authenticated a request (``last_used_s``; hashes of file keys match nothing)."""
        async with self.db.transaction() as tx:
            for digest in sorted(key_hashes):
                await tx.execute("UPDATE admin_keys SET last_used_s = ? WHERE key_hash = ? "
                                 "AND (last_used_s IS NULL OR last_used_s < ?)", at_s, digest, at_s)

    async def report_tap(self, gateway_id: str, worker: int, pid: int, version: int,
                         rejected: Sequence[Rejected] = ()) -> None:
        """Record the version a tap worker runs and the entries it left out (no version bump: this is not a
        change of the state)."""
        report = orjson.dumps([{"entry": r.entry, "error": r.error} for r in rejected]).decode()
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO admin_taps (gateway_id, worker, pid, version, seen_s, rejected) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (gateway_id, worker) DO UPDATE SET pid = excluded.pid, version = excluded.version, "
                "seen_s = excluded.seen_s, rejected = excluded.rejected", gateway_id, worker, pid, version,
                self.clock(), report)


def _object(text: str) -> Mapping[str, Any]:
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value
