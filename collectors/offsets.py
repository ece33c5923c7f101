"""Contiguous offset tracking: what may be committed while several batches are in flight.

Batches are acknowledged in any order, but a partition's committed offset may only move
past records that are all handled. Per partition the tracker keeps the offset ranges handed
to batches, in fetch order; a commit stops below the lowest range not yet acknowledged
(Kafka Connect's rule), so a crash at any moment re-delivers at most what was in flight and
never skips a record.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from aiokafka import TopicPartition


@dataclass(slots=True)
class _Range:
    batch: int
    end: int  # one past the last offset of the batch in this partition
    done: bool = False


class OffsetTracker:
    """Per partition: the ranges of in-flight batches, and the offset that is safe to commit."""

    def __init__(self) -> None:
        self._ranges: dict[TopicPartition, deque[_Range]] = {}
        self._ready: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def add(self, batch: int, tp: TopicPartition, end: int) -> None:
        """Batch ``batch`` holds records of ``tp`` up to ``end`` (exclusive); batches are added in fetch order."""
        self._ranges.setdefault(tp, deque()).append(_Range(batch, end))

    def ack(self, batch: int, tps: Iterable[TopicPartition]) -> None:
        """Batch ``batch`` is handled (and flushed, its dead letters acknowledged) for ``tps``."""
        for tp in tps:
            ranges = self._ranges.get(tp)
            if ranges is None:
                continue  # forgotten (revoked): its new owner handles it again
            for r in ranges:
                if r.batch == batch:
                    r.done = True
                    break
            while ranges and ranges[0].done:
                self._ready[tp] = ranges.popleft().end

    def committable(self, tps: Iterable[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """The offsets to commit now: per partition the end of the acknowledged prefix, if not committed yet."""
        ready = self._ready if tps is None else {tp: self._ready[tp] for tp in tps if tp in self._ready}
        return {tp: off for tp, off in ready.items() if self._committed.get(tp, -1) < off}

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Record that ``offsets`` were committed."""
        for tp, off in offsets.items():
            if self._committed.get(tp, -1) < off:
                self._committed[tp] = off

    def pending(self, tp: TopicPartition) -> int:
        """Ranges of ``tp`` not yet acknowledged or behind one that is not."""
        return len(self._ranges.get(tp, ()))

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Drop revoked partitions: later acks for them are ignored, nothing more is committed for them."""
        for tp in tps:
            self._ranges.pop(tp, None)
            self._ready.pop(tp, None)
            self._committed.pop(tp, None)
