"""The built-in ``file`` collector: JSON Lines, one directory per event type, rotated segments.

Layout under ``directory``::

    analytics/events.current.jsonl                 # the open segment (appended to)
    analytics/events-20261125T110000.123456Z.jsonl  # sealed segments (.jsonl.gz with compress: true)

Each line is the event exactly as it was on Kafka (already validated by the runtime),
so the hot path never serialises again. Segments rotate when the clock enters a new
``rotate_interval_s`` window (hourly by default, checked when events arrive) or when one
reaches ``rotate_bytes``. ``flush`` fsyncs the open segment before the runtime commits
(``fsync: never`` trusts the page cache instead). A crash can leave a torn last line:
on start it is cut off (its event was never committed, so Kafka hands it over again)
and the segment is sealed. Output is at-least-once: deduplicate by ``id``.

Processes sharing ``directory`` need distinct ``file_prefix`` values (the default is
the worker's ``group_instance_id``, else ``events``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from pydantic import Field

from collectors.config import parse_collector_config
from collectors.sdk import CollectorServices, DataCollector
from gateway_tap.settings import Section
from schemas import EVENT_TYPES, Analytics, BudgetUsage, Event, EventType, ProxyLog

CURRENT_SUFFIX = ".current.jsonl"


def repair_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline; returns the number of bytes cut off."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        pos = size
        chunk = 64 * 1024
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def compress_segment(path: Path) -> Path:
    """Gzip ``path`` to ``path.gz`` (via a temp file, fsynced, renamed) and remove ``path``."""
    target = path.with_name(path.name + ".gz")
    tmp = path.with_name(path.name + ".gz.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6) as gz:
            shutil.copyfileobj(src, gz, 1024 * 1024)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, target)
    path.unlink()
    return target


class _Segment:
    """The open segment of one event type. Its methods block: call them in a worker thread."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self.path = directory / f"{prefix}{CURRENT_SUFFIX}"
        self.file: IO[bytes] | None = None
        self.size = 0
        self.window = 0
        self.dirty = False

    def open(self, window: int) -> None:
        self.file = open(self.path, "ab")
        self.size = self.file.tell()
        self.window = window

    def write(self, data: bytes) -> None:
        assert self.file is not None
        self.file.write(data)
        self.size += len(data)
        self.dirty = True

    def sync(self, fsync: bool) -> None:
        if self.file is not None and self.dirty:
            self.file.flush()
            if fsync:
                os.fsync(self.file.fileno())
            self.dirty = False

    def seal(self) -> Path | None:
        """Close, fsync and rename the open segment; returns the sealed path (None when it was empty)."""
        if self.file is not None:
            self.sync(fsync=True)
            self.file.close()
            self.file = None
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        while True:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            sealed = self.directory / f"{self.prefix}-{stamp}.jsonl"
            if not sealed.exists():
                break
        os.replace(self.path, sealed)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # make the rename itself durable
        finally:
            os.close(fd)
        return sealed


class FileConfig(Section):
    """The ``file`` collector's config."""

    directory: str = Field(min_length=1, description="Root directory of the output.")
    file_prefix: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$",
                                    description="Segment name prefix (default: group_instance_id, else 'events'); "
                                                "distinct per process sharing a directory.")
    rotate_interval_s: int = Field(default=3600, ge=1,
                                   description="A new segment when the clock enters a new window of this length.")
    rotate_bytes: int = Field(default=256 * 1024 * 1024, ge=1024,
                              description="A new segment when the open one would exceed this size.")
    compress: bool = Field(default=False, description="Gzip sealed segments (in a thread).")
    fsync: Literal["always", "never"] = Field(
        default="always", description="always: fsync the open segments before every commit; never: trust the "
                                      "page cache.")


class FileCollector(DataCollector):
    """Writes every event type to rotating JSON Lines files (see the module docstring)."""

    event_types = EVENT_TYPES
    Config = FileConfig

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        settings = parse_collector_config(services.name, FileConfig, config)
        self.root = Path(settings.directory)
        prefix = settings.file_prefix or services.extras.get("group_instance_id") or "events"
        self.interval = settings.rotate_interval_s
        self.max_bytes = settings.rotate_bytes
        self.compress = settings.compress
        self.fsync = settings.fsync == "always"
        self._compressing: set[asyncio.Task[Path]] = set()
        self.segments: dict[EventType, _Segment] = {}
        for event_type in self.consumed_types():
            directory = self.root / event_type
            self.segments[event_type] = await asyncio.to_thread(self._recover, directory, prefix)

    def _recover(self, directory: Path, prefix: str) -> _Segment:
        directory.mkdir(parents=True, exist_ok=True)
        segment = _Segment(directory, prefix)
        if segment.path.exists():
            cut = repair_torn_tail(segment.path)
            if cut:
                self.services.logger.warning("cut a torn last line (%d bytes) off %s", cut, segment.path)
            sealed = segment.seal()
            if sealed and self.compress:
                compress_segment(sealed)
        for stale in directory.glob(f"{prefix}-*.jsonl.gz.tmp"):
            stale.unlink()  # a compression interrupted by a crash; the .jsonl is still there
        if self.compress:
            for left in directory.glob(f"{prefix}-*.jsonl"):
                compress_segment(left)
        segment.open(self._window())
        return segment

    def _window(self) -> int:
        return int(time.time() // self.interval)

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        data = b"\n".join(values) + b"\n"
        if data.count(b"\n") != len(values):
            # Valid JSON may contain raw newlines between tokens; one event must stay one line.
            data = b"".join(orjson.dumps(orjson.loads(v)) + b"\n" for v in values)
        sealed = await asyncio.to_thread(self._append, self.segments[event_type], data)
        if sealed is not None and self.compress:
            task = asyncio.create_task(asyncio.to_thread(compress_segment, sealed))
            self._compressing.add(task)
            task.add_done_callback(self._compressing.discard)

    def _append(self, segment: _Segment, data: bytes) -> Path | None:
        sealed = None
        window = self._window()
        if window != segment.window or (segment.size and segment.size + len(data) > self.max_bytes):
            sealed = segment.seal()
            segment.open(window)
        segment.write(data)
        return sealed

    async def handle_batch(self, event_type: EventType, events: Sequence[Event]) -> None:
        """Typed entry point (used by the test harness): serialises the events, then appends them."""
        await self.handle_raw_batch(event_type, events, [e.to_json() for e in events])

    async def handle_proxy_log(self, event: ProxyLog) -> None:
        await self.handle_batch("proxy_log", [event])

    async def handle_analytics(self, event: Analytics) -> None:
        await self.handle_batch("analytics", [event])

    async def handle_budget_usage(self, event: BudgetUsage) -> None:
        await self.handle_batch("budget_usage", [event])

    async def flush(self) -> None:
        await asyncio.to_thread(self._sync_all)

    def _sync_all(self) -> None:
        for segment in self.segments.values():
            segment.sync(self.fsync)

    async def close(self) -> None:
        if self._compressing:
            await asyncio.gather(*self._compressing, return_exceptions=True)
        for segment in self.segments.values():
            with contextlib.suppress(OSError):
                await asyncio.to_thread(segment.sync, True)
            if segment.file is not None:
                segment.file.close()
                segment.file = None
