"""The ``lake`` collector: each Kafka partition's events rolled into Parquet objects, exactly once.

Built on the public collector SDK only: it reads where each event came from
(:meth:`~collectors.sdk.DataCollector.handle_records`) and holds records across batches
(:attr:`~collectors.sdk.DataCollector.holds_records`), reporting through ``precommit`` what is durable.

**Rolls.** Per Kafka partition the collector holds the events handed over (as Arrow tables) until
``flush_max_rows``, ``flush_max_bytes`` or ``rotate_interval_ms`` (or the runtime forcing it), then writes
them as one *roll*: one object per layout directory its events fall in (usually one), every one named
``<topic>+<partition>+<first offset>+<last offset>.parquet``. Each object is complete before anything is
reported durable (fsync + link locally; one PUT or a completed multipart upload on S3), and written with
``If-None-Match: *`` / ``link`` so a complete object is never replaced. A roll spanning several
directories is announced by a marker (``_lake/pending/...``) written first and deleted last.

**Exactly once.** Offsets are committed only once a roll is complete, so after a crash the partition is
handed over again from the start of a roll that may or may not have been written. Before holding anything
of a partition it got (again), the collector (1) deletes the objects of rolls whose marker is still there
(incomplete), then (2) looks, in the directory of the first event handed over, for a complete roll holding
that offset: its events are stored already and are skipped (reported durable without being written), and
the lookup repeats after it, until an offset no roll holds. So a redelivery or a replay of a range writes
no object twice and no event in two objects; a replay leaves the existing objects as they are (count
before == after). To rewrite a range (e.g. with columns added since), delete its objects first.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prometheus_client import CollectorRegistry, Counter, Histogram

from collectors.config import parse_collector_config
from collectors.metrics import DURATION_BUCKETS, FRESHNESS_BUCKETS
from collectors.sdk import CollectorServices, DataCollector, Partition, Positions, RetryLater
from collectors.sinks.lake.config import LakeConfig
from collectors.sinks.lake.layout import (
    PENDING_PREFIX,
    Layout,
    object_name,
    parse_name,
    partition_prefix,
    pending_key,
)
from collectors.sinks.lake.store import Store, StoreError, open_store
from schemas import EVENT_TYPES, Event, EventType
from schemas.arrow import arrow_schema, table_from_values

OFFSET_COLUMN = "__offset"
FRESHNESS_SAMPLES = 32
"""Events per object whose freshness (emitted_at -> object complete) is observed."""
ROLL_KEY = b"gateway_tap.lake.roll"
"""Parquet metadata key of each object: the roll it belongs to (topic, partition, first, last, directories)."""


@dataclass
class _Partition:
    """What the collector holds of one Kafka partition."""

    topic: str
    partition: int
    event_type: EventType
    chunks: list[pa.Table] = field(default_factory=list)  # held rows in offset order, with OFFSET_COLUMN
    rows: int = 0
    value_bytes: int = 0
    opened_at: float = 0.0  # monotonic time the oldest held row arrived
    seen: int = -1  # highest offset handed over
    recovered: bool = False  # incomplete rolls of this partition cleaned up
    probing: bool = True  # still looking for complete rolls that hold the next offsets

    @property
    def durable(self) -> int:
        """Every record handed over below this offset is stored."""
        if self.chunks:
            first: int = self.chunks[0][OFFSET_COLUMN][0].as_py()
            return first
        return self.seen + 1


def parquet_bytes(table: pa.Table, row_group_rows: int, level: int, metadata: Mapping[bytes, bytes]) -> bytes:
    """``table`` as a zstd Parquet file (statistics and dictionaries on, so engines prune and decode fast)."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=level, row_group_size=row_group_rows,
                   write_statistics=True, use_dictionary=True)
    return sink.getvalue()


class LakeCollector(DataCollector):
    """Writes every event type as Parquet objects (see the module docstring)."""

    event_types = EVENT_TYPES
    holds_records = True
    Config = LakeConfig

    @staticmethod
    def register_metrics(registry: CollectorRegistry) -> tuple[Counter, Counter, Histogram, Histogram]:
        """The collector's own metrics on ``registry``: objects, rows, write time, freshness at the object."""
        return (
            Counter("gateway_tap_lake_objects_total", "Parquet objects written, by event type.", ["type"],
                    registry=registry),
            Counter("gateway_tap_lake_rows_total", "Events by outcome: written, or skipped because a complete "
                    "object already holds them (after a crash, a rebalance or a replay).", ["type", "outcome"],
                    registry=registry),
            Histogram("gateway_tap_lake_write_seconds", "Time to write one roll (all its objects).",
                      buckets=DURATION_BUCKETS, registry=registry),
            Histogram("gateway_tap_lake_freshness_seconds", "From an event's emitted_at to the moment the object "
                      "holding it was complete (readable), sampled.", ["type"], buckets=FRESHNESS_BUCKETS,
                      registry=registry),
        )

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        registry = services.metrics if isinstance(services.metrics, CollectorRegistry) else CollectorRegistry()
        self.objects_c, self.rows_c, self.write_h, self.freshness_h = self.register_metrics(registry)
        self.settings = parse_collector_config(services.name, LakeConfig, config)
        self.setting = f"collectors.{services.name}.config"
        self.layout = Layout.parse(self.settings.layout)
        self.store: Store = open_store(self.settings, self.setting)
        self.parts: dict[Partition, _Partition] = {}
        self.checked = False  # the destination answered a check since the start or the last failure
        self.objects_written = 0
        self.rolls_written = 0
        self.rows_skipped = 0

    # -- handing over ---------------------------------------------------------------------------------------

    async def handle_records(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes],
                             positions: Positions) -> None:
        if not values:
            return
        table = await asyncio.to_thread(self._table, event_type, values, positions)
        sizes = pa.array([len(v) for v in values], pa.int64())
        partitions = pa.array(positions.partitions, pa.int64())
        for p in pc.unique(partitions).to_pylist():
            mask = pc.equal(partitions, p)
            part = self.parts.get((positions.topic, p))
            if part is None:
                part = self.parts[(positions.topic, p)] = _Partition(positions.topic, p, event_type)
            await self._take(part, table.filter(mask), pc.sum(pc.filter(sizes, mask)).as_py() or 0)

    def _table(self, event_type: EventType, values: Sequence[bytes], positions: Positions) -> pa.Table:
        table = table_from_values(event_type, values)
        return table.append_column(OFFSET_COLUMN, pa.array(positions.offsets, pa.int64()))

    async def _take(self, part: _Partition, rows: pa.Table, value_bytes: int) -> None:
        """Hold ``rows`` (one partition's, in offset order) after dropping what is held or stored already."""
        offsets = rows[OFFSET_COLUMN]
        last = pc.max(offsets).as_py()
        if last <= part.seen:
            return  # handed over again after a retry: held already
        rows = rows.filter(pc.greater(offsets, part.seen))
        seen, part.seen = part.seen, last
        try:
            if not part.recovered:
                await asyncio.to_thread(self._clean_incomplete, part)
                part.recovered = True
            while part.probing and rows.num_rows:
                stored_until = await asyncio.to_thread(self._stored_until, part, rows)
                if stored_until is None:
                    part.probing = False
                    break
                before = rows.num_rows
                rows = rows.filter(pc.greater(rows[OFFSET_COLUMN], stored_until))
                self.rows_skipped += before - rows.num_rows
                self.rows_c.labels(part.event_type, "skipped").inc(before - rows.num_rows)
        except StoreError as exc:
            part.seen = seen  # the retry hands these over again
            self.checked = False
            raise RetryLater(str(exc)) from exc
        if rows.num_rows:
            if not part.chunks:
                part.opened_at = time.monotonic()
            part.chunks.append(rows)
            part.rows += rows.num_rows
            part.value_bytes += value_bytes

    def _clean_incomplete(self, part: _Partition) -> None:
        """Delete the objects of this partition's rolls that were being written when the last owner stopped."""
        for marker in self.store.list(PENDING_PREFIX + partition_prefix(part.topic, part.partition)):
            keys = orjson.loads(self.store.get(marker))["objects"]
            self.services.logger.warning("removing the incomplete roll %s (%d object(s))", marker, len(keys))
            self.store.delete(keys)
            self.store.delete([marker])

    def _stored_until(self, part: _Partition, rows: pa.Table) -> int | None:
        """The last offset of a complete roll holding the first of ``rows`` (None: no roll does)."""
        first = rows[OFFSET_COLUMN][0].as_py()
        unit = rows["emitted_at"][0].value // self.layout.unit_us
        directory = self.layout.directory(part.event_type, unit)
        for key in self.store.list(f"{directory}/{partition_prefix(part.topic, part.partition)}"):
            name = parse_name(key)
            if name is not None and name.first <= first <= name.last:
                return name.last
        return None

    # -- writing ----------------------------------------------------------------------------------------------

    async def precommit(self, force: bool) -> Mapping[Partition, int]:
        now = time.monotonic()
        s = self.settings
        due = [part for part in self.parts.values() if part.chunks and (
            force or part.rows >= s.flush_max_rows or part.value_bytes >= s.flush_max_bytes
            or (now - part.opened_at) * 1000 >= s.rotate_interval_ms)]
        if due:
            try:
                if not self.checked:
                    await asyncio.to_thread(self.store.check)
                    self.checked = True
                for part in due:
                    await self._roll(part)
            except StoreError as exc:
                self.checked = False
                raise RetryLater(str(exc)) from exc
        return {key: part.durable for key, part in self.parts.items()}

    async def _roll(self, part: _Partition) -> None:
        """Write what ``part`` holds (in rolls of at most ``flush_max_rows``), then let go of it."""
        chunks = list(part.chunks)
        table = pa.concat_tables(chunks)
        step = self.settings.flush_max_rows
        for start in range(0, table.num_rows, step):
            await asyncio.to_thread(self._write_roll, part, table.slice(start, step))
        if len(part.chunks) == len(chunks) and all(a is b for a, b in zip(part.chunks, chunks, strict=True)):
            part.chunks.clear()  # (a released partition's were cleared already)
            part.rows = part.value_bytes = 0

    def _write_roll(self, part: _Partition, table: pa.Table) -> None:
        started = time.monotonic()
        offsets = table[OFFSET_COLUMN]
        first, last = offsets[0].as_py(), offsets[-1].as_py()
        units = pc.divide(pc.cast(table["emitted_at"], pa.int64()), self.layout.unit_us)
        groups: dict[str, list[int]] = {}
        for unit in pc.unique(units).to_pylist():
            groups.setdefault(self.layout.directory(part.event_type, unit), []).append(unit)
        name = object_name(part.topic, part.partition, first, last)
        first_dir = self.layout.directory(part.event_type, units[0].as_py())
        # The directory of the first event last: a roll is found by its first offset (see _stored_until).
        order = sorted(groups, key=lambda d: d == first_dir)
        keys = [f"{d}/{name}" for d in order]
        marker = pending_key(part.topic, part.partition, first, last) if len(keys) > 1 else None
        if marker is not None:
            self.store.put(marker, orjson.dumps({"objects": keys}), if_absent=False)
        meta = {ROLL_KEY: orjson.dumps({"topic": part.topic, "partition": part.partition, "first": first,
                                        "last": last, "objects": keys})}
        columns = arrow_schema(part.event_type).names
        for directory, key in zip(order, keys, strict=True):
            rows = table if len(groups) == 1 else table.filter(pc.is_in(units, pa.array(groups[directory])))
            data = parquet_bytes(rows.select(columns), self.settings.row_group_rows, self.settings.compression_level,
                                 meta)
            self.store.put(key, data, if_absent=True)
            self.objects_written += 1
            self.objects_c.labels(part.event_type).inc()
        if marker is not None:
            self.store.delete([marker])
        self.rolls_written += 1
        self.write_h.observe(time.monotonic() - started)
        self.rows_c.labels(part.event_type, "written").inc(table.num_rows)
        now = time.time()
        emitted = table["emitted_at"]
        step = max(1, table.num_rows // FRESHNESS_SAMPLES)
        for value in emitted.take(pa.array(range(0, table.num_rows, step))).to_pylist():
            self.freshness_h.labels(part.event_type).observe(max(0.0, now - value.timestamp()))

    async def release(self, partitions: Collection[Partition]) -> None:
        for key in partitions:
            part = self.parts.pop(key, None)
            if part is not None:
                part.chunks.clear()  # a roll being written finishes; nothing more is written for it

    async def close(self) -> None:
        self.parts.clear()
