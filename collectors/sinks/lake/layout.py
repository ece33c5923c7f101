"""Where the lake's objects go and what they are called.

Directories: the ``layout`` template, Hive style (``type=analytics/dt=2026-12-07/hour=14``), filled from each
event's ``emitted_at`` (UTC). Objects: ``<topic>+<partition>+<first offset>+<last offset>.parquet``, offsets
zero-padded to 20 digits (so names sort by offset; Kafka Connect's S3 sink names by topic, partition and start
offset). All objects written from one *roll* (a partition's events written at once) carry the roll's name, one
per directory its events fall in, so a redelivered or replayed roll maps to names that already exist.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime

PLACEHOLDERS = ("type", "dt", "year", "month", "day", "hour")
OFFSET_DIGITS = 20
PENDING_PREFIX = "_lake/pending/"
"""Markers of rolls being written to several directories (outside the layout: readers never see them)."""
_NAME = re.compile(r"^(?P<topic>[A-Za-z0-9._-]+)\+(?P<partition>\d+)\+(?P<first>\d{20})\+(?P<last>\d{20})\.parquet$")
US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR


@dataclass(frozen=True)
class Layout:
    """A parsed ``layout`` template."""

    template: str
    segments: tuple[tuple[str, str], ...]  # (column name, placeholder)

    @classmethod
    def parse(cls, template: str) -> Layout:
        """:raises ValueError: not 'name={placeholder}' segments, an unknown placeholder, or no {type}."""
        segments = []
        for part in template.strip("/").split("/"):
            name, eq, value = part.partition("=")
            fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
            if not eq or not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or len(fields) != 1 or value != f"{{{fields[0]}}}":
                raise ValueError(f"layout segment {part!r} is not of the form name={{placeholder}}")
            if fields[0] not in PLACEHOLDERS:
                raise ValueError(f"layout placeholder {{{fields[0]}}} is not one of {', '.join(PLACEHOLDERS)}")
            segments.append((name, fields[0]))
        if "type" not in [p for _, p in segments]:
            raise ValueError("the layout needs a {type} segment: each event type has its own columns")
        if len({n for n, _ in segments}) != len(segments):
            raise ValueError("layout segment names must be distinct")
        return cls(template, tuple(segments))

    @property
    def unit_us(self) -> int:
        """Events are grouped by hour when the layout has {hour}, else by day."""
        return US_PER_HOUR if any(p == "hour" for _, p in self.segments) else US_PER_DAY

    @property
    def partition_columns(self) -> list[tuple[str, str]]:
        """The (column, placeholder) segments below the event type's directory, in order."""
        placeholders = [p for _, p in self.segments]
        return list(self.segments[placeholders.index("type") + 1:])

    def type_prefix(self, event_type: str) -> str:
        """The directory prefix of one event type, up to the first time segment (with a trailing '/')."""
        out = []
        for name, placeholder in self.segments:
            if placeholder != "type":
                break
            out.append(f"{name}={event_type}")
        before = []
        for name, placeholder in self.segments:
            if placeholder == "type":
                break
            before.append((name, placeholder))
        if before:
            raise ValueError("the {type} segment must come first")
        return "/".join(out) + "/"

    def directory(self, event_type: str, unit: int) -> str:
        """The directory of events of ``event_type`` in time unit ``unit`` (``emitted_at`` µs // ``unit_us``)."""
        when = datetime.fromtimestamp(unit * self.unit_us / 1_000_000, UTC)
        values = {"type": event_type, "dt": when.strftime("%Y-%m-%d"), "year": when.strftime("%Y"),
                  "month": when.strftime("%m"), "day": when.strftime("%d"), "hour": when.strftime("%H")}
        return "/".join(f"{name}={values[p]}" for name, p in self.segments)


def object_name(topic: str, partition: int, first: int, last: int) -> str:
    """The name of every object of the roll holding offsets ``first``..``last`` of ``topic[partition]``."""
    return f"{topic}+{partition}+{first:0{OFFSET_DIGITS}d}+{last:0{OFFSET_DIGITS}d}.parquet"


def partition_prefix(topic: str, partition: int) -> str:
    """What every object name of one Kafka partition starts with."""
    return f"{topic}+{partition}+"


@dataclass(frozen=True)
class ObjectName:
    """A parsed object name."""

    topic: str
    partition: int
    first: int
    last: int


def parse_name(name: str) -> ObjectName | None:
    """The parts of an object name (the last path segment), None when it is not a lake object."""
    match = _NAME.match(name.rsplit("/", 1)[-1])
    if match is None:
        return None
    return ObjectName(match["topic"], int(match["partition"]), int(match["first"]), int(match["last"]))


def pending_key(topic: str, partition: int, first: int, last: int) -> str:
    """The marker written before a roll spanning several directories and deleted once all of them are complete."""
    return PENDING_PREFIX + object_name(topic, partition, first, last).removesuffix(".parquet") + ".json"
