"""``gateway-tap dlq list|show|replay``: inspect dead letters and send chosen ones back after a fix.

A dead letter is the original record (key, value, headers) plus the headers the collector
runtime appended (:func:`collectors.dlq.dlq_headers`). Replaying sends key, value and the
original headers, without ours, to ``original_topic``; the partition is chosen by key, as
the tap does. Entries are named ``PARTITION:OFFSET`` (a bare offset means partition 0).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.table import Table

from gateway_tap.ops.kafka_admin import KafkaInspector, KafkaUnavailable, Record, quiet_client_logs
from gateway_tap.ops.status import dlq_topics
from gateway_tap.settings import GatewayConfig

DLQ_HEADER_NAMES = ("collector", "error", "error_class", "original_topic", "original_partition", "original_offset")
"""The headers the runtime appends, in order (see :func:`collectors.dlq.dlq_headers`)."""


class DlqError(Exception):
    """A dead-letter request that cannot be served (unknown topic or entry); the message says which."""


Ref = tuple[int, int]
"""(partition, offset) of one dead letter."""


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One record of a DLQ topic, with the runtime's headers split from the original ones."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_record(cls, rec: Record) -> DeadLetterEntry:
        return cls(rec.topic, rec.partition, rec.offset, rec.timestamp, rec.key, rec.value,
                   tuple((k, bytes(v or b"")) for k, v in rec.headers or ()))

    @property
    def ref(self) -> str:
        return f"{self.partition}:{self.offset}"

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (ours come last), decoded."""
        for key, value in reversed(self.headers):
            if key == name:
                return value.decode("utf-8", "replace")
        return None

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        """The record's headers before the runtime appended its own."""
        n = len(DLQ_HEADER_NAMES)
        if tuple(k for k, _ in self.headers[-n:]) == DLQ_HEADER_NAMES:
            return list(self.headers[:-n])
        return [(k, v) for k, v in self.headers if k not in DLQ_HEADER_NAMES]

    @property
    def origin(self) -> str:
        return f"{self.header('original_topic')}[{self.header('original_partition')}]@{self.header('original_offset')}"

    def summary(self) -> dict[str, Any]:
        """The fields ``dlq list`` shows (and prints as JSON)."""
        return {"ref": self.ref, "offset": self.offset, "partition": self.partition,
                "time": datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
                "original_topic": self.header("original_topic"),
                "original_partition": self.header("original_partition"),
                "original_offset": self.header("original_offset"), "collector": self.header("collector"),
                "error_class": self.header("error_class"), "error": self.header("error")}


@dataclass
class DlqListing:
    topic: str
    exists: bool
    count: int
    last: list[DeadLetterEntry]


def parse_refs(text: str) -> list[Ref]:
    """``1,2,5`` or ``0:1,2:7`` -> [(partition, offset), ...]. :raises DlqError: malformed."""
    refs: list[Ref] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        partition, _, offset = part.rpartition(":")
        if not offset.isdigit() or (partition and not partition.isdigit()):
            raise DlqError(f"{part!r} is not OFFSET or PARTITION:OFFSET")
        refs.append((int(partition or 0), int(offset)))
    if not refs:
        raise DlqError("no offsets given")
    return refs


async def list_dlq(kafka: KafkaInspector, config: GatewayConfig, topic: str | None = None,
                   last: int = 10) -> list[DlqListing]:
    """Per DLQ topic (or just ``topic``): the record count and the ``last`` newest entries."""
    topics = [topic] if topic else await dlq_topics(kafka, config.kafka.topic_prefix)
    parts = await kafka.partitions(topics)
    begin, end = await kafka.offsets([tp for tps in parts.values() for tp in tps])
    out = []
    for t in topics:
        entries: list[DeadLetterEntry] = []
        for tp in parts.get(t, []):
            recs = await kafka.read(tp, max(begin[tp], end[tp] - last), end[tp]) if last > 0 else []
            entries += [DeadLetterEntry.from_record(r) for r in recs]
        entries.sort(key=lambda e: (e.timestamp_ms, e.partition, e.offset))
        count = sum(end[tp] - begin[tp] for tp in parts.get(t, []))
        out.append(DlqListing(t, t in parts, count, entries[-last:] if last > 0 else []))
    return out


async def read_entries(kafka: KafkaInspector, topic: str, refs: Iterable[Ref] | None) -> list[DeadLetterEntry]:
    """The entries at ``refs``, or every entry of ``topic`` when ``refs`` is None.

    :raises DlqError: the topic does not exist or an entry is not (or no longer) in it.
    """
    parts = (await kafka.partitions([topic])).get(topic)
    if parts is None:
        raise DlqError(f"topic {topic!r} does not exist")
    begin, end = await kafka.offsets(parts)
    if refs is None:
        return [DeadLetterEntry.from_record(r) for tp in parts for r in await kafka.read(tp, begin[tp], end[tp])]
    out = []
    for partition, offset in refs:
        tp = TopicPartition(topic, partition)
        if tp not in begin or not begin[tp] <= offset < end[tp]:
            span = f"offsets {begin[tp]}..{end[tp] - 1}" if tp in begin else f"{len(parts)} partition(s)"
            raise DlqError(f"{topic} has no entry {partition}:{offset} ({span})")
        recs = await kafka.read(tp, offset, offset + 1)
        if not recs:
            raise DlqError(f"{topic} has no record at {partition}:{offset}")
        out.append(DeadLetterEntry.from_record(recs[0]))
    return out


async def send_back(config: GatewayConfig, entries: list[DeadLetterEntry]) -> list[tuple[DeadLetterEntry, str]]:
    """Produce each entry's key, value and original headers to its ``original_topic`` (acks=all).

    :returns: each entry with where it landed (``topic[partition]@offset``).
    :raises DlqError: an entry lacks ``original_topic``. :raises KafkaUnavailable: a send failed.
    """
    for e in entries:
        if not e.header("original_topic"):
            raise DlqError(f"{e.topic} {e.ref} has no original_topic header: not written by a collector")
    producer = AIOKafkaProducer(**config.kafka.client_options(), client_id=f"{config.kafka.client_id}-dlq-replay",
                                acks="all", max_request_size=64 * 1024 * 1024)
    try:
        await producer.start()
        futures = [await producer.send(e.header("original_topic") or "", e.value, key=e.key,
                                       headers=e.original_headers) for e in entries]
        landed = await asyncio.gather(*futures)
    except KafkaError as exc:
        raise KafkaUnavailable(config.kafka.bootstrap_servers, exc) from exc
    finally:
        await producer.stop()
    return [(e, f"{md.topic}[{md.partition}]@{md.offset}") for e, md in zip(entries, landed, strict=True)]


# -- rendering ------------------------------------------------------------------------------------------------

def _short(text: str | None, width: int = 100) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_listing(listings: list[DlqListing], console: Console) -> None:
    for item in listings:
        if not item.exists:
            console.print(f"[bold]{item.topic}[/]: [dim]not created[/]")
            continue
        console.print(f"[bold]{item.topic}[/]: [{'red' if item.count else 'green'}]{item.count:,} record(s)[/]")
        if not item.last:
            continue
        table = Table(show_edge=False, pad_edge=False)
        for col in ("entry", "time", "original", "collector", "error"):
            table.add_column(col, overflow="fold")
        for e in item.last:
            s = e.summary()
            table.add_row(e.ref, s["time"], e.origin, s["collector"] or "-",
                          f"[yellow]{s['error_class']}[/] {_short(s['error'])}")
        console.print(table)


def render_entry(entry: DeadLetterEntry, console: Console, max_bytes: int = 64 * 1024) -> None:
    """Headers, key and value (pretty JSON when it parses; cut at ``max_bytes`` either way)."""
    s = entry.summary()
    console.print(f"[bold]{entry.topic}[/] entry {entry.ref}  written {s['time']}")
    table = Table("header", "value", show_edge=False, pad_edge=False)
    for key, value in entry.headers:
        table.add_row(key, value.decode("utf-8", "replace"))
    console.print(table)
    console.print(f"key: {entry.key.decode('utf-8', 'replace') if entry.key is not None else '(none)'}")
    body = entry.value
    if body is None:
        console.print("value: (none: a tombstone)")
        return
    console.print(f"value ({len(body):,} bytes):")
    if len(body) <= max_bytes:
        try:
            console.print_json(orjson.dumps(orjson.loads(body)).decode())
            return
        except orjson.JSONDecodeError:
            pass
    console.print(body[:max_bytes].decode("utf-8", "replace"), markup=False, highlight=False)
    if len(body) > max_bytes:
        console.print(f"[dim]... {len(body) - max_bytes:,} more bytes not shown (--max-bytes)[/]")


# -- commands -------------------------------------------------------------------------------------------------

def _run(config: GatewayConfig, console: Console, work: Callable[[KafkaInspector], Awaitable[int]]) -> int:
    """Run ``work`` with a connected inspector; exit 2 when Kafka is unreachable, 1 for a bad request."""
    quiet_client_logs()

    async def main() -> int:
        async with KafkaInspector(config.kafka.client_options(), f"{config.kafka.client_id}-dlq") as kafka:
            return await work(kafka)

    try:
        return asyncio.run(main())
    except KafkaUnavailable as exc:
        console.print(f"[bold red]{exc}[/]")
        return 2
    except DlqError as exc:
        console.print(f"[bold red]{exc}[/]")
        return 1


def run_list(config: GatewayConfig, topic: str | None, last: int, as_json: bool, console: Console) -> int:
    """``gateway-tap dlq list``."""

    async def work(kafka: KafkaInspector) -> int:
        listings = await list_dlq(kafka, config, topic, last)
        if as_json:
            doc = [{"topic": i.topic, "exists": i.exists, "count": i.count, "last": [e.summary() for e in i.last]}
                   for i in listings]
            print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
        else:
            render_listing(listings, console)
        return 0

    return _run(config, console, work)


def run_show(config: GatewayConfig, topic: str, ref: str, max_bytes: int, console: Console) -> int:
    """``gateway-tap dlq show``."""

    async def work(kafka: KafkaInspector) -> int:
        [entry] = await read_entries(kafka, topic, parse_refs(ref)[:1])
        render_entry(entry, console, max_bytes)
        return 0

    return _run(config, console, work)


def run_replay(config: GatewayConfig, topic: str, offsets: str | None, everything: bool, yes: bool,
               console: Console) -> int:
    """``gateway-tap dlq replay``: choose, confirm (unless ``yes``), send, print what went where."""

    async def work(kafka: KafkaInspector) -> int:
        entries = await read_entries(kafka, topic, None if everything else parse_refs(offsets or ""))
        if not entries:
            console.print(f"{topic} is empty: nothing to replay")
            return 0
        for e in entries:
            console.print(f"  {e.ref} -> {e.header('original_topic')}  "
                          f"[yellow]{e.header('error_class')}[/] {_short(e.header('error'), 80)}")
        if not yes and not await asyncio.to_thread(click.confirm, f"send {len(entries)} dead letter(s) back?"):
            console.print("nothing sent")
            return 1
        for e, landed in await send_back(config, entries):
            console.print(f"sent {e.topic} {e.ref} -> {landed}")
        console.print(f"{len(entries)} dead letter(s) sent back; they stay in {topic} (the DLQ is append-only)")
        return 0

    return _run(config, console, work)
