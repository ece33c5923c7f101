"""The plugins' shared key-value store (SQLite, WAL): shared across processes, TTL, byte bound with eviction."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from gateway_tap.plugins import shared_kv
from gateway_tap.plugins.shared_kv import SharedKVStore


def _incr_many(path: str, n: int) -> int:
    async def run() -> int:
        store = SharedKVStore(path)
        kv = store.namespace("counter", 1 << 20)
        last = 0
        for _ in range(n):
            last = await kv.incr("hits")
        await kv.set("from_child", b"bytes stay bytes")
        await store.close()
        return last

    return asyncio.run(run())


def test_atomic_increments_from_two_processes_and_values_seen_across(tmp_path: Path) -> None:
    path = str(tmp_path / "kv.sqlite")
    # fork: the children need nothing but this module; a sync test, so no event loop is running when forking.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        results = list(pool.map(_incr_many, [path, path], [150, 150]))
    assert max(results) == 300

    async def check() -> None:
        store = SharedKVStore(path)
        try:
            kv = store.namespace("counter", 1 << 20)
            assert await kv.get("hits") == 300
            assert await kv.get("from_child") == b"bytes stay bytes"
            assert await store.namespace("other", 1 << 20).get("hits") is None  # namespaces are apart
            await kv.set("json", {"a": [1, 2]})
            assert await kv.get("json") == {"a": [1, 2]}
            await kv.delete("json")
            assert await kv.get("json") is None
        finally:
            await store.close()
            await store.close()  # twice is fine

    loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the suite's event loop
    try:
        loop.run_until_complete(check())
    finally:
        loop.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A settable wall clock for the store (expiry is wall-clock time)."""
    fake = types.SimpleNamespace(now=1_000_000.0)
    monkeypatch.setattr(shared_kv, "time", types.SimpleNamespace(time=lambda: fake.now))
    return fake


async def test_ttl_expiry(tmp_path: Path, clock: types.SimpleNamespace) -> None:
    store = SharedKVStore(tmp_path / "kv.sqlite")
    kv = store.namespace("p", 1 << 20)
    try:
        await kv.set("short", b"x", ttl_s=10)
        await kv.set("forever", b"y")
        await kv.incr("n", ttl_s=10)
        clock.now += 9.9
        assert await kv.get("short") == b"x" and await kv.incr("n") == 2
        clock.now += 0.2
        assert await kv.get("short") is None and await kv.get("forever") == b"y"
        assert await kv.incr("n") == 1  # an expired counter starts over
    finally:
        await store.close()


async def test_byte_bound_evicts_expired_then_oldest(tmp_path: Path, clock: types.SimpleNamespace) -> None:
    store = SharedKVStore(tmp_path / "kv.sqlite")
    kv = store.namespace("cache", 1000)
    neighbour = store.namespace("neighbour", 1000)
    try:
        await neighbour.set("keep", b"n" * 500)
        for i in range(5):  # 5 x (2 + 198) = 1000 bytes: exactly full
            await kv.set(f"k{i}", b"v" * 198, ttl_s=100 if i == 3 else None)
        assert await kv.usage() == (1000, 5)
        clock.now += 200  # k3 expired: the next write drops it before any live entry
        await kv.set("k5", b"v" * 198)
        assert await kv.get("k0") == b"v" * 198 and await kv.get("k3") is None
        await kv.set("k6", b"v" * 398)  # needs two entries' room: the two oldest go
        assert [await kv.get(f"k{i}") is not None for i in range(7)] == [False, False, True, False, True, True, True]
        used, entries = await kv.usage()
        assert used <= 1000 and entries == 4
        with pytest.raises(OverflowError):
            await kv.set("huge", b"x" * 1000)
        assert await neighbour.get("keep") == b"n" * 500  # the bound is per namespace
    finally:
        await store.close()


async def test_bytes_values_are_evicted_before_counters(tmp_path: Path) -> None:
    """A cache's bookkeeping (incr counters, JSON) outlives the cached payloads (bytes) it describes."""
    store = SharedKVStore(tmp_path / "kv.sqlite")
    kv = store.namespace("cache", 600)
    try:
        assert await kv.incr("stats:hits") == 1  # the oldest write of all
        for i in range(4):
            await kv.set(f"entry{i}", b"x" * 190)
        assert await kv.get("entry0") is None and await kv.get("entry3") == b"x" * 190
        assert await kv.incr("stats:hits") == 2
        used, _ = await kv.usage()
        assert used <= 600
    finally:
        await store.close()


def _hold_write_lock(path: Path, held: threading.Event, hold_s: float) -> None:
    """Another opener mid-way through creating the schema: a RESERVED lock on a file not yet in WAL mode."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
    held.set()
    time.sleep(hold_s)
    conn.execute("COMMIT")
    conn.close()


async def test_opening_while_another_process_holds_the_write_lock_waits_instead_of_failing(tmp_path: Path) -> None:
    # SQLite does not call the busy handler for `PRAGMA journal_mode = WAL` against a RESERVED lock: without the
    # store's own wait this failed at once with "database is locked" (seen when two processes opened a new file).
    path = tmp_path / "kv.sqlite"
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(path, held, 0.3))
    holder.start()
    assert await asyncio.to_thread(held.wait, 10)
    store = SharedKVStore(path)
    try:
        assert await store.namespace("p", 1 << 20).incr("n") == 1
    finally:
        await store.close()
        holder.join()
