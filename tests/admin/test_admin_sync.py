"""How a worker follows the admin state (StateSync) against a real SQLite / PostgreSQL database: a version
change, the end of a rotated key's overlap, a database that is down at start."""

from __future__ import annotations

from pathlib import Path

from gateway_tap.admin.db import apply_migrations, connect
from gateway_tap.admin.state import AdminState
from gateway_tap.admin.store import AdminStore
from gateway_tap.admin.sync import StateSync
from gateway_tap.budgets.store import StoreUnavailable
from gateway_tap.settings import BudgetSettings, BudgetStoreSettings, parse_config
from tests.support.tap import tap_config


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_version_changes_and_key_overlap_are_applied(budget_store_settings: BudgetStoreSettings,
                                                           tmp_path: Path) -> None:
    clock = Clock()
    store = AdminStore(await connect(budget_store_settings), clock=clock)
    applied: list[AdminState] = []

    async def apply(state: AdminState) -> bool:
        applied.append(state)
        return True

    sync = StateSync(store, apply, interval_s=60, gateway_id="g", worker=3, clock=clock)
    config = parse_config(tap_config("http://127.0.0.1:9", "127.0.0.1:9", "t", tmp_path))
    try:
        await sync.poll()
        assert [s.version for s in applied] == [0]  # the first poll applies whatever is there
        await sync.poll()
        assert len(applied) == 1  # nothing moved: nothing applied
        await store.create_app("team", "Team", ["*"], {})
        ((old, _secret), _) = await store.issue_key("team")
        (_rotated_old, new, _new_secret), version = await store.rotate_key("team", old.id, overlap_s=10)
        await sync.poll()
        assert applied[-1].version == version == sync.applied_version
        team = next(a for a in applied[-1].overlay(config, clock.now).config.apps if a.id == "team")
        assert set(team.key_hashes) == {old.key_hash, new.key_hash}  # the overlap: both keys work
        clock.now += 11
        await sync.poll()  # no version change, but the old key's overlap ended
        assert len(applied) == 3
        team = next(a for a in applied[-1].overlay(config, clock.now).config.apps if a.id == "team")
        assert team.key_hashes == [new.key_hash]
        assert [(t.worker, t.version) for t in await store.taps()] == [(3, version)]
    finally:
        await sync.stop()
        await store.close()


async def test_a_database_down_at_start_is_retried(budget_store_settings: BudgetStoreSettings) -> None:
    store = AdminStore(await connect(budget_store_settings, migrate=False))
    attempts: list[int] = []

    async def prepare() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise StoreUnavailable("down")
        await apply_migrations(budget_store_settings)

    applied: list[int] = []

    async def apply(state: AdminState) -> bool:
        applied.append(state.version)
        return True

    sync = StateSync(store, apply, interval_s=60, gateway_id="g", worker=0, prepare=prepare)
    try:
        await sync.poll()
        assert applied == [] and len(attempts) == 1
        await sync.poll()
        assert applied == [0] and len(attempts) == 2
        await sync.poll()
        assert len(attempts) == 2  # migrated once, never again
    finally:
        await store.close()


async def test_key_ids_and_key_budgets_follow_the_lineage(budget_store_settings: BudgetStoreSettings,
                                                          tmp_path: Path) -> None:
    """The overlay names an API app's keys by their lineage (a rotation's successor shares it) and applies a key's
    budgets; a key budget naming no key of its app is left out and reported, the rest applies."""
    store = AdminStore(await connect(budget_store_settings))
    config = parse_config(tap_config("http://127.0.0.1:9", "127.0.0.1:9", "t", tmp_path))
    try:
        await store.create_app("team", "Team", ["*"], {})
        ((old, _), _) = await store.issue_key("team")
        await store.set_budget(BudgetSettings(app_id="team", key_id=old.id, limit_usd=1, period="daily"))
        await store.set_budget(BudgetSettings(app_id="team", key_id="key_nobody", limit_usd=1))
        (_, new, _), _ = await store.rotate_key("team", old.id, overlap_s=60)
        overlay = (await store.state()).overlay(config, new.created_s + 1)
        team = next(a for a in overlay.config.apps if a.id == "team")
        assert team.key_ids == {old.key_hash: old.id, new.key_hash: old.id}
        assert [b.key for b in overlay.config.budgets if b.key_id] == [f"team@{old.id}:daily"]
        assert [(r.entry, r.error) for r in overlay.rejected] == [
            ("apps/team/keys/key_nobody/budgets/team@key_nobody:monthly",
             "key_id: app 'team' has no key 'key_nobody'")]
        _, version = await store.delete_budget("team", None, "daily", old.id)
        assert not [b for b in (await store.state()).budgets if b.key_id == old.id] and version > 0
    finally:
        await store.close()
