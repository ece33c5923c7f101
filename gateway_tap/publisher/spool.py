"""Durable on-disk spool: append-only segment files of framed Kafka messages.

Layout: ``<dir>/<seq:016d>.seg``, each starting with :data:`MAGIC`, then records
``[u32 length][u32 crc32][payload]``; the CRC covers the length and the payload, so a
torn tail (crash mid-write) or a flipped bit is detected. A damaged record ends the
reading of its segment: its framing can no longer be trusted, and what follows is
counted as lost instead of being misread.

Durability: every append batch is written and flushed to the OS in one call, so a
crash of the process loses nothing. ``fsync`` runs at most every
``fsync_interval_s`` (0 = after every batch), at segment roll and on close: a power
loss can lose at most that interval. fsync per batch costs a disk round trip per
batch, which is why it is not the default.

A process only ever appends to a segment it created; segments left by an earlier
process are read-only, so their torn tails are recognisable. Reading is at-least-once:
:meth:`Spool.read_batch` returns records from the committed position and
:meth:`Spool.ack` moves that position and deletes segments read to the end. If the
process dies between send and ack, the batch is sent again (sinks dedupe by id).

The class is synchronous and not thread-safe: the publisher calls it from one
dedicated thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple

log = logging.getLogger(__name__)

MAGIC = b"GTSPOOL\x01"
_FRAME = struct.Struct(">II")  # length, crc32
_HEAD = struct.Struct(">qHiH")  # timestamp_ms, topic length, key length (-1 = None), header count
_HDR = struct.Struct(">HI")  # header name length, value length
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""A length field above this is corruption, not a record."""


class Message(NamedTuple):
    """One Kafka message as the publisher sends it."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    timestamp_ms: int


def encode_record(msg: Message) -> bytes:
    """A framed record (length, CRC, payload) for ``msg``."""
    topic = msg.topic.encode()
    key = msg.key
    parts = [_HEAD.pack(msg.timestamp_ms, len(topic), -1 if key is None else len(key), len(msg.headers)), topic]
    if key is not None:
        parts.append(key)
    for name, value in msg.headers:
        raw_name = name.encode()
        parts += [_HDR.pack(len(raw_name), len(value)), raw_name, value]
    parts.append(msg.value)
    payload = b"".join(parts)
    length = _FRAME.size + len(payload)
    crc = zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big")))
    return _FRAME.pack(length, crc) + payload


def decode_payload(payload: bytes) -> Message:
    ts, topic_len, key_len, n_headers = _HEAD.unpack_from(payload, 0)
    pos = _HEAD.size
    topic = payload[pos:pos + topic_len].decode()
    pos += topic_len
    key = None
    if key_len >= 0:
        key = payload[pos:pos + key_len]
        pos += key_len
    headers = []
    for _ in range(n_headers):
        name_len, value_len = _HDR.unpack_from(payload, pos)
        pos += _HDR.size
        name = payload[pos:pos + name_len].decode()
        pos += name_len
        headers.append((name, payload[pos:pos + value_len]))
        pos += value_len
    return Message(topic, payload[pos:], key, headers, ts)


class SpoolCorruption(Exception):
    """A record failed its CRC or framing check."""


def iter_records(data: bytes, start: int) -> Iterable[tuple[int, Message]]:
    """``(end offset, message)`` for each whole record in ``data`` from ``start``.

    Stops silently at a torn tail (incomplete record at the end of ``data``).
    :raises SpoolCorruption: a record whose CRC or framing is wrong.
    """
    pos = start
    size = len(data)
    while pos + _FRAME.size <= size:
        length, crc = _FRAME.unpack_from(data, pos)
        if length < _FRAME.size + _HEAD.size or length > MAX_RECORD_BYTES:
            raise SpoolCorruption(f"bad record length {length} at offset {pos}")
        end = pos + length
        if end > size:
            return  # torn tail
        payload = data[pos + _FRAME.size:end]
        if zlib.crc32(payload, zlib.crc32(length.to_bytes(4, "big"))) != crc:
            raise SpoolCorruption(f"CRC mismatch at offset {pos}")
        try:
            msg = decode_payload(payload)
        except (struct.error, UnicodeDecodeError) as exc:
            raise SpoolCorruption(f"undecodable record at offset {pos}: {exc}") from None
        yield end, msg
        pos = end


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int = 0
    records: int = 0
    topics: Counter[str] = field(default_factory=Counter)
    sealed: bool = True  # False only for the segment this process appends to
    readable_end: int | None = None  # sealed segments: where valid data ends (torn tail / corruption excluded)


class AppendResult(NamedTuple):
    written: Counter[str]
    """Records written, by topic."""
    dropped: Counter[str]
    """Records dropped because the spool's disk budget was exhausted, by topic."""


class ReadBatch(NamedTuple):
    messages: list[Message]
    cursor: tuple[int, int]
    """Position after the batch: pass it to :meth:`Spool.ack` once Kafka acknowledged every message."""


class Spool:
    """Append-only segment files in ``directory``; see the module docstring for the format and guarantees.

    :param directory: created if missing; segments left there by an earlier process are read first.
    :param segment_bytes: a segment rolls when it reaches this size.
    :param max_bytes: disk budget (None = unbounded).
    :param on_full: ``drop_newest`` refuses new records, ``drop_oldest`` deletes whole oldest segments.
    :param fsync_interval_s: at most this long between a write and its fsync (0 = fsync every batch).
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 8 * 1024 * 1024, max_bytes: int | None = None,
                 on_full: Literal["drop_newest", "drop_oldest"] = "drop_newest",
                 fsync_interval_s: float = 1.0) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        # A budget must hold a few segments, or drop_oldest would throw away everything at once.
        self.segment_bytes = segment_bytes if max_bytes is None else max(4096, min(segment_bytes, max_bytes // 4))
        self.on_full = on_full
        self.fsync_interval_s = fsync_interval_s
        self._segments: dict[int, _Segment] = {}
        self._next_seq = 0
        self._active: _Segment | None = None
        self._writer: IO[bytes] | None = None
        self._dirty_since: float | None = None
        self._cursor: tuple[int, int] = (0, len(MAGIC))  # committed read position
        self._head_consumed: Counter[str] = Counter()  # records acked in the cursor's segment, by topic
        self._head_consumed_n = 0
        self._reader: tuple[int, IO[bytes]] | None = None
        self.corrupt_segments = 0
        self.lost_bytes = 0
        """Bytes after a torn tail or a corrupt record, skipped when reading."""
        self.opened = False

    # ---------------------------------------------------------------- state

    @property
    def pending_events(self) -> int:
        return sum(s.records for s in self._segments.values()) - self._head_consumed_n

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments.values())

    @property
    def segments(self) -> int:
        return len(self._segments)

    def open(self) -> None:
        """Create the directory and index the segments an earlier process left (validating every record)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob("*.seg")):
            try:
                seq = int(path.stem)
            except ValueError:
                continue
            seg = _Segment(seq, path)
            self._scan(seg)
            if seg.records == 0:
                path.unlink(missing_ok=True)
                continue
            self._segments[seq] = seg
            self._next_seq = max(self._next_seq, seq + 1)
        if self._segments:
            self._cursor = (min(self._segments), len(MAGIC))
        self.opened = True

    def _scan(self, seg: _Segment) -> None:
        data = seg.path.read_bytes()
        seg.size = len(data)
        if not data.startswith(MAGIC):
            log.error("spool segment %s has no valid header; skipping it (%d bytes)", seg.path, len(data))
            self.corrupt_segments += 1
            self.lost_bytes += len(data)
            seg.readable_end = len(MAGIC)
            return
        end = len(MAGIC)
        try:
            for rec_end, msg in iter_records(data, len(MAGIC)):
                end = rec_end
                seg.records += 1
                seg.topics[msg.topic] += 1
        except SpoolCorruption as exc:
            self.corrupt_segments += 1
            log.error("spool segment %s: %s; %d bytes after it are skipped", seg.path, exc, len(data) - end)
        if end < len(data):
            self.lost_bytes += len(data) - end
            log.warning("spool segment %s: %d bytes of torn or corrupt tail skipped", seg.path, len(data) - end)
        seg.readable_end = end

    # ---------------------------------------------------------------- writing

    def append(self, messages: Sequence[Message]) -> AppendResult:
        """Write ``messages`` in order (one write + flush per segment); drop by ``on_full`` when over budget.

        :raises OSError: the disk refused the write; the records of the failed write are not in the
            spool (a partial write is truncated away), earlier segments of this call are.
        """
        written: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        buf: list[bytes] = []
        buf_bytes = 0  # kept incrementally: a batch can hold tens of thousands of records
        topics: Counter[str] = Counter()
        for msg in messages:
            record = encode_record(msg)
            if self.max_bytes is not None:
                if len(record) + len(MAGIC) > self.max_bytes:
                    dropped[msg.topic] += 1
                    continue
                if self.size_bytes + buf_bytes + len(record) + self._header_cost() > self.max_bytes:
                    if self.on_full == "drop_newest":
                        dropped[msg.topic] += 1
                        continue
                    self._write(buf, topics, written)
                    buf, buf_bytes, topics = [], 0, Counter()
                    while self._segments and self.size_bytes + len(record) + self._header_cost() > self.max_bytes:
                        oldest = min(self._segments)
                        if self._active is not None and oldest == self._active.seq:
                            self._roll()
                        self._drop_segment(oldest, dropped)
            active = self._active
            if active is not None and (buf or active.records) and \
                    active.size + buf_bytes + len(record) > self.segment_bytes:
                self._write(buf, topics, written)
                buf, buf_bytes, topics = [], 0, Counter()
                self._roll()
            if self._active is None:
                self._new_segment()
            buf.append(record)
            buf_bytes += len(record)
            topics[msg.topic] += 1
        self._write(buf, topics, written)
        return AppendResult(written, dropped)

    def _header_cost(self) -> int:
        return 0 if self._active is not None else len(MAGIC)

    def _drop_segment(self, seq: int, dropped: Counter[str]) -> None:
        seg = self._segments.pop(seq)
        remaining = seg.topics.copy()
        if self._cursor[0] == seq:
            remaining.subtract(self._head_consumed)
        lost = {t: n for t, n in remaining.items() if n > 0}
        dropped.update(lost)
        self._close_reader(seq)
        seg.path.unlink(missing_ok=True)
        if self._cursor[0] <= seq:
            self._move_cursor_to_head()
        log.warning("spool over its %s byte budget: dropped segment %s (%d events)",
                    self.max_bytes, seg.path.name, sum(lost.values()))

    def _write(self, buf: list[bytes], topics: Counter[str], written: Counter[str]) -> None:
        if not buf:
            return
        assert self._active is not None and self._writer is not None
        data = b"".join(buf)
        try:
            self._writer.write(data)
            self._writer.flush()
        except OSError:
            # Keep the segment whole: cut off whatever part of the batch reached the file.
            with contextlib.suppress(OSError):
                self._writer.seek(self._active.size)
                self._writer.truncate(self._active.size)
            raise
        seg = self._active
        seg.size += len(data)
        seg.topics.update(topics)
        seg.records += sum(topics.values())
        written.update(topics)
        now = time.monotonic()
        if self._dirty_since is None:
            self._dirty_since = now
        if self.fsync_interval_s == 0 or now - self._dirty_since >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        """fsync the segment being written, if it has unsynced data."""
        if self._writer is not None and self._dirty_since is not None:
            os.fsync(self._writer.fileno())
        self._dirty_since = None

    def sync_due(self) -> bool:
        return self._dirty_since is not None and time.monotonic() - self._dirty_since >= self.fsync_interval_s

    def _new_segment(self) -> None:
        seq = self._next_seq
        self._next_seq += 1
        path = self.directory / f"{seq:016d}.seg"
        self._writer = open(path, "xb")  # lives until the segment rolls
        self._writer.write(MAGIC)
        self._writer.flush()
        self._active = _Segment(seq, path, size=len(MAGIC), sealed=False)
        self._segments[seq] = self._active
        if len(self._segments) == 1:
            self._cursor = (seq, len(MAGIC))
            self._reset_head()
        self._sync_dir()

    def _roll(self) -> None:
        """Seal the active segment (fsync and close it); the next append starts a new one."""
        if self._writer is None or self._active is None:
            return
        self.sync()
        self._writer.close()
        self._writer = None
        self._active.sealed = True
        self._active.readable_end = self._active.size
        if self._active.records == 0:
            self._segments.pop(self._active.seq, None)
            self._active.path.unlink(missing_ok=True)
            self._close_reader(self._active.seq)
        self._active = None

    def _sync_dir(self) -> None:
        # The new file's directory entry must survive a power loss as well.
        _fsync_directory(self.directory)

    # ---------------------------------------------------------------- reading

    def read_batch(self, max_events: int = 2_000, max_bytes: int = 4 * 1024 * 1024) -> ReadBatch | None:
        """Up to ``max_events`` records from the committed position, oldest first; None when nothing is pending."""
        while self._segments:
            seq, offset = self._cursor
            seg = self._segments.get(seq)
            if seg is None:
                self._move_cursor_to_head()
                continue
            end = seg.readable_end if seg.sealed and seg.readable_end is not None else seg.size
            if offset >= end:
                if not seg.sealed:
                    return None  # caught up with the writer
                self._finish_segment(seq)
                continue
            reader = self._open_reader(seg)
            reader.seek(offset)
            data = reader.read(min(end - offset, max_bytes))
            messages, pos = self._parse(seg, data, offset, max_events)
            if not messages and len(data) < end - offset and seg.readable_end != offset:
                data += reader.read(end - offset - len(data))  # a single record larger than max_bytes
                messages, pos = self._parse(seg, data, offset, max_events)
            if messages:
                return ReadBatch(messages, (seq, pos))
            if not seg.sealed:
                return None
            self._finish_segment(seq)  # only a torn or corrupt tail was left
        return None

    def _parse(self, seg: _Segment, data: bytes, offset: int, max_events: int) -> tuple[list[Message], int]:
        messages: list[Message] = []
        pos = offset
        try:
            for rec_end, msg in iter_records(data, 0):
                messages.append(msg)
                pos = offset + rec_end
                if len(messages) >= max_events:
                    break
        except SpoolCorruption as exc:
            # Written by this process after the scan, then damaged on disk: stop reading this segment there.
            log.error("spool segment %s: %s; the rest of the segment is skipped", seg.path, exc)
            self.corrupt_segments += 1
            self.lost_bytes += seg.size - pos
            if seg is self._active:
                self._roll()
            seg.sealed = True
            seg.readable_end = pos
        return messages, pos

    def ack(self, batch: ReadBatch) -> None:
        """Kafka acknowledged every message of ``batch``: commit the position, delete finished segments."""
        seq, pos = batch.cursor
        if seq not in self._segments or (seq, pos) <= self._cursor:
            return  # that segment was dropped (drop_oldest) meanwhile
        if seq != self._cursor[0]:
            self._cursor = (seq, len(MAGIC))
            self._reset_head()
        for msg in batch.messages:
            self._head_consumed[msg.topic] += 1
        self._head_consumed_n += len(batch.messages)
        self._cursor = (seq, pos)
        seg = self._segments[seq]
        if seg.sealed and pos >= (seg.readable_end or seg.size):
            self._finish_segment(seq)
        elif not seg.sealed and pos >= seg.size:
            # Drained up to the writer: roll so the fully read segment can be deleted and the spool empties.
            self._roll()
            if seq in self._segments:
                self._finish_segment(seq)

    def _finish_segment(self, seq: int) -> None:
        seg = self._segments.pop(seq, None)
        self._close_reader(seq)
        if seg is not None:
            seg.path.unlink(missing_ok=True)
        self._move_cursor_to_head()

    def _move_cursor_to_head(self) -> None:
        self._reset_head()
        self._cursor = (min(self._segments), len(MAGIC)) if self._segments else (self._next_seq, len(MAGIC))

    def _reset_head(self) -> None:
        self._head_consumed = Counter()
        self._head_consumed_n = 0

    def _open_reader(self, seg: _Segment) -> IO[bytes]:
        if self._reader is not None and self._reader[0] == seg.seq:
            return self._reader[1]
        if self._reader is not None:
            self._reader[1].close()
        handle = open(seg.path, "rb")  # cached until the segment is finished
        self._reader = (seg.seq, handle)
        return handle

    def _close_reader(self, seq: int) -> None:
        if self._reader is not None and self._reader[0] == seq:
            self._reader[1].close()
            self._reader = None

    def close(self) -> None:
        """fsync and close; the segments stay for the next process. Safe to call twice."""
        if self._writer is not None:
            self.sync()
            self._writer.close()
            self._writer = None
        if self._active is not None:
            self._active.sealed = True
            self._active.readable_end = self._active.size
            if self._active.records == 0:
                self._segments.pop(self._active.seq, None)
                self._active.path.unlink(missing_ok=True)
            self._active = None
        if self._reader is not None:
            self._reader[1].close()
            self._reader = None


def adopt_orphan_spools(root: Path, workers: int) -> int:
    """Hand the spools of workers that no longer exist to the ones that do; returns segments moved.

    A tap's worker ``n`` spools into ``<root>/worker-<n>``. After a restart with fewer
    workers, ``worker-<k>`` for ``k >= workers`` would never be drained: its segments
    move to ``worker-<k % workers>``, numbered after that spool's own, so they are sent
    after what was already there (per-key order only ever held within one worker).
    Call it before any worker opens its spool.
    """
    moved = 0
    for orphan in sorted(root.glob("worker-*"), key=lambda p: p.name):
        index = orphan.name.removeprefix("worker-")
        if not index.isdigit() or int(index) < workers or not orphan.is_dir():
            continue
        target = root / f"worker-{int(index) % workers}"
        target.mkdir(parents=True, exist_ok=True)
        next_seq = max((int(p.stem) for p in target.glob("*.seg") if p.stem.isdigit()), default=-1) + 1
        segments = sorted(p for p in orphan.glob("*.seg") if p.stem.isdigit())
        for segment in segments:
            os.replace(segment, target / f"{next_seq:016d}.seg")
            next_seq += 1
        if segments:
            _fsync_directory(target)  # the renames survive a crash right after
            moved += len(segments)
        with contextlib.suppress(OSError):
            orphan.rmdir()  # only when empty: anything else in it is left alone
    if moved:
        log.warning("adopted %d spool segment(s) of workers that no longer exist", moved)
    return moved


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
