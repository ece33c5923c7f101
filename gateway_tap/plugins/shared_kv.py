"""The plugins' shared key-value store: one SQLite file (WAL) that every worker process of a tap opens.

A plugin gets it with ``kv: {backend: shared, max_bytes: N}`` in its ``plugins[]`` entry;
otherwise it gets the per-process :class:`~gateway_tap.services.MemoryKV`
(a dict: no I/O, nothing to bound by bytes, right for per-worker counters).

Why SQLite: it is in the standard library, safe across processes (WAL: readers never
block, one writer at a time, ``busy_timeout`` waits for the lock), and survives a
worker restart. Every call runs on one thread per worker process (its own
connection), never on the event loop.

Bounds: each plugin's namespace holds at most ``max_bytes`` of keys and values (counted
exactly by triggers in ``kv_usage``). A write that would exceed it first drops the
namespace's expired entries, then its oldest writes (FIFO; ``bytes`` values such as cached
responses go before JSON values such as ``incr`` counters, so bookkeeping outlives the
payloads it describes), until the new entry fits; a
single value larger than ``max_bytes`` is refused with :class:`OverflowError`. On disk the
file is about ``sum(max_bytes) x 1.3`` (page overhead; freed pages are reused, not
returned) plus the WAL (checkpointed at ~4 MB). Memory per worker: SQLite's page cache
(``cache_kib``, 2 MiB by default) plus the values in flight. Expiry uses wall-clock time
(shared by the processes).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import monotonic, sleep  # apart from `time`, which tests replace with a settable clock
from typing import Any

import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, is_bytes INTEGER NOT NULL,
    expires REAL, size INTEGER NOT NULL, UNIQUE (ns, key));
CREATE INDEX IF NOT EXISTS kv_ns ON kv (ns);  -- (ns, rowid): a namespace's entries in write order
CREATE TABLE IF NOT EXISTS kv_usage (ns TEXT PRIMARY KEY, bytes INTEGER NOT NULL, entries INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS kv_ins AFTER INSERT ON kv BEGIN
    INSERT INTO kv_usage (ns, bytes, entries) VALUES (NEW.ns, NEW.size, 1)
    ON CONFLICT (ns) DO UPDATE SET bytes = bytes + NEW.size, entries = entries + 1;
END;
CREATE TRIGGER IF NOT EXISTS kv_del AFTER DELETE ON kv BEGIN
    UPDATE kv_usage SET bytes = bytes - OLD.size, entries = entries - 1 WHERE ns = OLD.ns;
END;
CREATE TRIGGER IF NOT EXISTS kv_upd AFTER UPDATE ON kv BEGIN
    UPDATE kv_usage SET bytes = bytes - OLD.size + NEW.size WHERE ns = NEW.ns;
END;
"""


def _encode(value: Any) -> tuple[bytes, int]:
    """Bytes are stored as they are (a cached response body); anything else as JSON."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), 1
    return orjson.dumps(value), 0


def _decode(blob: bytes, is_bytes: int) -> Any:
    return bytes(blob) if is_bytes else orjson.loads(blob)


def _enable_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Put the file in WAL mode, waiting up to ``timeout_s`` for other processes.

    The mode is stored in the file, so only the first opener changes it. Changing it needs an exclusive
    lock for which SQLite does not call the busy handler: two workers opening a new file at the same time
    got "database is locked" at once. So: read the mode first, and retry the change with a short backoff.
    """
    deadline = monotonic() + timeout_s
    delay_s = 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or monotonic() >= deadline:
                raise
            sleep(delay_s)  # in the store's own thread, never the event loop
            delay_s = min(delay_s * 2, 0.1)


class SharedKVStore:
    """The SQLite file and this process's connection to it; hands out one :class:`SharedKV` per plugin.

    :param path: the database file (created with its directory).
    :param busy_timeout_ms: how long a write waits for another process's write lock.
    :param cache_kib: SQLite page cache of this connection.
    """

    def __init__(self, path: str | Path, *, busy_timeout_ms: int = 5000, cache_kib: int = 2048) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._cache_kib = cache_kib
        self._conn: sqlite3.Connection | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-tap-shared-kv")

    def namespace(self, name: str, max_bytes: int) -> SharedKV:
        """The store seen by plugin ``name``, bounded to ``max_bytes`` of keys and values."""
        return SharedKV(self, name, max_bytes)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(connection, *args)`` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, args)

    def _call(self, fn: Any, args: tuple[Any, ...]) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return fn(self._conn, *args)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front,
        # so two processes never deadlock upgrading a read to a write).
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        _enable_wal(conn, self._busy_timeout_ms / 1000)
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against a process crash
        conn.execute(f"PRAGMA cache_size = -{int(self._cache_kib)}")
        conn.execute("PRAGMA journal_size_limit = 16777216")
        conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")  # one process creates, the others wait
        return conn

    async def close(self) -> None:
        """Close this process's connection. Safe to call twice."""
        def _close(_: Any) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, _close, None)
        self._executor.shutdown(wait=False)


def _get(conn: sqlite3.Connection, ns: str, key: str) -> Any:
    row = conn.execute("SELECT value, is_bytes, expires FROM kv WHERE ns = ? AND key = ?", (ns, key)).fetchone()
    if row is None or (row[2] is not None and row[2] < time.time()):
        return None
    return _decode(row[0], row[1])


def _make_room(conn: sqlite3.Connection, ns: str, size: int, max_bytes: int) -> None:
    """Inside a write transaction: drop expired, then oldest entries until ``size`` more bytes fit."""
    def used() -> int:
        row = conn.execute("SELECT bytes FROM kv_usage WHERE ns = ?", (ns,)).fetchone()
        return int(row[0]) if row else 0

    if used() + size <= max_bytes:
        return
    conn.execute("DELETE FROM kv WHERE ns = ? AND expires IS NOT NULL AND expires < ?", (ns, time.time()))
    need = used() + size - max_bytes
    if need <= 0:
        return
    freed = 0
    doomed: list[int] = []
    rows = conn.execute("SELECT rowid, size FROM kv WHERE ns = ? ORDER BY is_bytes DESC, rowid", (ns,))
    for rowid, entry_size in rows:
        freed += entry_size
        doomed.append(rowid)
        if freed >= need:
            break
    conn.executemany("DELETE FROM kv WHERE rowid = ?", ((rowid,) for rowid in doomed))


def _write(conn: sqlite3.Connection, ns: str, key: str, blob: bytes, is_bytes: int, expires: float | None,
           max_bytes: int) -> None:
    size = len(key.encode()) + len(blob)
    conn.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, key))  # a rewrite counts as the newest entry
    _make_room(conn, ns, size, max_bytes)
    conn.execute("INSERT INTO kv (ns, key, value, is_bytes, expires, size) VALUES (?, ?, ?, ?, ?, ?)",
                 (ns, key, blob, is_bytes, expires, size))


def _in_write(conn: sqlite3.Connection, fn: Any, *args: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn, *args)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def _set(conn: sqlite3.Connection, ns: str, key: str, blob: bytes, is_bytes: int, expires: float | None,
         max_bytes: int) -> None:
    _in_write(conn, _write, ns, key, blob, is_bytes, expires, max_bytes)


def _incr_tx(conn: sqlite3.Connection, ns: str, key: str, amount: int, ttl_s: float | None, max_bytes: int) -> int:
    row = conn.execute("SELECT value, is_bytes, expires FROM kv WHERE ns = ? AND key = ?", (ns, key)).fetchone()
    now = time.time()
    if row is None or (row[2] is not None and row[2] < now):
        value, expires = amount, (now + ttl_s if ttl_s else None)
    else:
        value, expires = int(_decode(row[0], row[1])) + amount, row[2]
    _write(conn, ns, key, orjson.dumps(value), 0, expires, max_bytes)
    return value


def _incr(conn: sqlite3.Connection, ns: str, key: str, amount: int, ttl_s: float | None, max_bytes: int) -> int:
    return int(_in_write(conn, _incr_tx, ns, key, amount, ttl_s, max_bytes))


def _delete(conn: sqlite3.Connection, ns: str, key: str) -> None:
    conn.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, key))


def _usage(conn: sqlite3.Connection, ns: str) -> tuple[int, int]:
    row = conn.execute("SELECT bytes, entries FROM kv_usage WHERE ns = ?", (ns,)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


class SharedKV:
    """One plugin's namespace of the :class:`SharedKVStore` (the :class:`~gateway_tap.hooks.KeyValueStore` API).

    Values are ``bytes`` (stored as they are) or anything orjson serialises. ``incr`` is atomic
    across processes (one write transaction).
    """

    def __init__(self, store: SharedKVStore, namespace: str, max_bytes: int) -> None:
        self._store = store
        self._ns = namespace
        self.max_bytes = max_bytes

    async def get(self, key: str) -> Any:
        return await self._store.run(_get, self._ns, key)

    async def set(self, key: str, value: Any, ttl_s: float | None = None) -> None:
        """Store ``value``; the oldest entries make room when the namespace is full.

        :raises OverflowError: the entry alone is larger than ``max_bytes``.
        """
        blob, is_bytes = _encode(value)
        if len(key.encode()) + len(blob) > self.max_bytes:
            raise OverflowError(f"entry of {len(blob)} bytes is larger than the store's max_bytes ({self.max_bytes})")
        await self._store.run(_set, self._ns, key, blob, is_bytes, time.time() + ttl_s if ttl_s else None,
                              self.max_bytes)

    async def delete(self, key: str) -> None:
        await self._store.run(_delete, self._ns, key)

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        return int(await self._store.run(_incr, self._ns, key, amount, ttl_s, self.max_bytes))

    async def usage(self) -> tuple[int, int]:
        """``(bytes, entries)`` currently held by this namespace (expired entries included until evicted)."""
        result: tuple[int, int] = await self._store.run(_usage, self._ns)
        return result
