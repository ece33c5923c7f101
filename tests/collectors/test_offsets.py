"""Unit tests of the contiguous offset tracker (out-of-order acks, revocation)."""

from __future__ import annotations

from aiokafka import TopicPartition

from collectors.offsets import OffsetTracker

A = TopicPartition("t", 0)
B = TopicPartition("t", 1)


def test_commits_stop_below_the_lowest_unacknowledged_batch() -> None:
    t = OffsetTracker()
    t.add(1, A, 10)
    t.add(2, A, 20)
    t.add(3, A, 30)
    t.ack(2, [A])
    t.ack(3, [A])
    assert t.committable() == {}, "batch 1 is still in flight: nothing past offset 0 may be committed"
    t.ack(1, [A])
    assert t.committable() == {A: 30}


def test_each_partition_advances_on_its_own() -> None:
    t = OffsetTracker()
    t.add(1, A, 10)
    t.add(1, B, 5)
    t.add(2, B, 8)
    t.add(3, A, 12)
    t.ack(2, [B])
    t.ack(3, [A])
    assert t.committable() == {}
    t.ack(1, [A, B])
    assert t.committable() == {A: 12, B: 8}
    assert t.committable([B]) == {B: 8}


def test_committed_offsets_are_not_offered_again() -> None:
    t = OffsetTracker()
    t.add(1, A, 10)
    t.ack(1, [A])
    t.committed(t.committable())
    assert t.committable() == {}
    t.add(2, A, 11)
    assert t.pending(A) == 1
    t.ack(2, [A])
    assert t.committable() == {A: 11}
    assert t.pending(A) == 0


def test_a_revoked_partition_is_forgotten_and_late_acks_are_ignored() -> None:
    t = OffsetTracker()
    t.add(1, A, 10)
    t.add(2, A, 20)
    t.add(2, B, 7)
    t.ack(1, [A])
    t.forget([A])
    t.ack(2, [A, B])
    assert t.committable() == {B: 7}
    t.add(3, A, 25)  # assigned again later: starts afresh
    t.ack(3, [A])
    assert t.committable([A]) == {A: 25}
