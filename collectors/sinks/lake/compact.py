"""``gateway-tap lake compact --before DATE``: merge each directory's small objects, never losing or doubling a row.

Per layout directory of a day before DATE, the objects of one Kafka partition are merged into one object named
like a roll, ``<topic>+<partition>+<lowest first offset>+<highest last offset>.parquet``: the collector's look-ups
after a crash or a replay (:mod:`.collector`) find it like any roll, so compacted hours are never written twice.
(One object per partition and directory: with one partition per topic, one object per hour.)

Order of a merge: a marker naming the target and its sources (``_lake/compacting/...``), the target (complete
before anything is removed: written like every object, and checked to hold exactly the sources' rows), the
sources removed, the marker removed. A run that stopped midway is finished by the next one: a marker whose
target exists has its remaining sources removed; one whose target does not has only its marker removed (the
sources are all there and are merged again). Between a target's completion and its sources' removal (a few
requests) a reader sees both; the run's end leaves every row in exactly one object.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from collectors.sinks.lake.collector import ROLL_KEY, parquet_bytes
from collectors.sinks.lake.config import LakeConfig
from collectors.sinks.lake.layout import Layout, ObjectName, object_name, parse_name
from collectors.sinks.lake.store import Store
from schemas import EVENT_TYPES

COMPACTING_PREFIX = "_lake/compacting/"
log = logging.getLogger("gateway_tap.lake.compact")


@dataclass
class CompactResult:
    """What a run did."""

    merged_objects: int = 0  # sources replaced
    written_objects: int = 0  # targets written
    rows: int = 0  # rows moved into targets
    finished_interrupted: int = 0  # merges of an earlier run completed


def directory_before(layout: Layout, directory: str, before: date) -> bool:
    """True when every event of ``directory`` (a layout directory) was emitted before ``before`` (UTC)."""
    values = dict(part.split("=", 1) for part in directory.split("/"))
    fields = {p: values[c] for c, p in layout.segments if c in values}
    if "dt" in fields:
        year, month, day = (int(x) for x in fields["dt"].split("-"))
    elif "year" in fields:
        year, month, day = int(fields["year"]), int(fields.get("month", 0)), int(fields.get("day", 0))
    else:
        return False  # no date in the layout: nothing is old
    if day:
        return date(year, month, day) < before
    if month:  # a whole month: it must end before the date
        return (year, month) < (before.year, before.month)
    return year < before.year


def _finish_interrupted(store: Store, result: CompactResult) -> None:
    for marker in store.list(COMPACTING_PREFIX):
        plan = orjson.loads(store.get(marker))
        target, sources = plan["target"], plan["sources"]
        directory = target.rsplit("/", 1)[0]
        if target in store.list(directory + "/"):
            store.delete([s for s in sources if s != target])
            result.finished_interrupted += 1
            log.info("finished the interrupted merge into %s", target)
        store.delete([marker])


def _merge(store: Store, config: LakeConfig, directory: str, names: list[ObjectName], keys: list[str],
           result: CompactResult) -> None:
    tables = [pq.read_table(pa.BufferReader(store.get(k))) for k in keys]
    merged = pa.concat_tables(tables, promote_options="default")  # files from before a field was added: nulls
    rows = sum(t.num_rows for t in tables)
    if merged.num_rows != rows:
        raise RuntimeError(f"merge of {directory} would hold {merged.num_rows} rows instead of {rows}")
    first, last = min(n.first for n in names), max(n.last for n in names)
    target = f"{directory}/{object_name(names[0].topic, names[0].partition, first, last)}"
    marker = COMPACTING_PREFIX + target.replace("/", "%2F") + ".json"
    store.put(marker, orjson.dumps({"target": target, "sources": keys}), if_absent=False)
    meta = {ROLL_KEY: orjson.dumps({"topic": names[0].topic, "partition": names[0].partition, "first": first,
                                    "last": last, "compacted_from": keys})}
    store.put(target, parquet_bytes(merged, config.row_group_rows, config.compression_level, meta), if_absent=True)
    check = pq.read_metadata(pa.BufferReader(store.get(target)))
    if check.num_rows != rows:
        raise RuntimeError(f"{target} holds {check.num_rows} rows, its sources {rows}: sources kept")
    store.delete(k for k in keys if k != target)
    store.delete([marker])
    result.merged_objects += len(keys)
    result.written_objects += 1
    result.rows += rows


def compact(store: Store, config: LakeConfig, before: date, types: Iterable[str] = EVENT_TYPES) -> CompactResult:
    """Merge, per directory of a day before ``before`` and per Kafka partition, the objects into one."""
    layout = Layout.parse(config.layout)
    result = CompactResult()
    _finish_interrupted(store, result)
    for event_type in types:
        groups: dict[tuple[str, str, int], list[tuple[ObjectName, str]]] = {}
        for key in store.list(layout.type_prefix(event_type)):
            name = parse_name(key)
            directory = key.rsplit("/", 1)[0]
            if name is None or not directory_before(layout, directory, before):
                continue
            groups.setdefault((directory, name.topic, name.partition), []).append((name, key))
        for (directory, _, _), found in sorted(groups.items()):
            if len(found) < 2:
                continue
            found.sort(key=lambda item: item[0].first)
            _merge(store, config, directory, [n for n, _ in found], [k for _, k in found], result)
    return result
