"""The disk spool on its own: framing, torn tails, CRC checks, rolling, disk budget."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gateway_tap.publisher.spool import MAGIC, Message, Spool, adopt_orphan_spools, encode_record


def msg(i: int, topic: str = "p.analytics", size: int = 100) -> Message:
    return Message(topic, f"value-{i:06d}-".encode().ljust(size, b"x"), f"k{i % 3}".encode() if i % 4 else None,
                   [("type", b"analytics"), ("n", str(i).encode())], 1_700_000_000_000 + i)


def drain(spool: Spool) -> list[Message]:
    out: list[Message] = []
    while (batch := spool.read_batch(max_events=7)) is not None:
        out += batch.messages
        spool.ack(batch)
    return out


def reopen(path: Path, **kw: object) -> Spool:
    spool = Spool(path, **kw)  # type: ignore[arg-type]
    spool.open()
    return spool


def test_round_trip_in_order_and_empty_after_drain(tmp_path: Path) -> None:
    spool = reopen(tmp_path)
    sent = [msg(i) for i in range(50)]
    result = spool.append(sent[:20])
    assert result.written == Counter({"p.analytics": 20}) and not result.dropped
    spool.append(sent[20:])
    assert spool.pending_events == 50
    assert drain(spool) == sent
    assert spool.pending_events == 0 and spool.segments == 0 and list(tmp_path.glob("*.seg")) == []


def test_survives_reopen_and_segments_roll(tmp_path: Path) -> None:
    spool = reopen(tmp_path, segment_bytes=4096)
    sent = [msg(i, size=300) for i in range(100)]
    for i in range(0, 100, 10):
        spool.append(sent[i:i + 10])
    assert spool.segments > 5
    assert all(p.stat().st_size <= 4096 for p in tmp_path.glob("*.seg"))
    spool.close()
    again = reopen(tmp_path, segment_bytes=4096)
    assert again.pending_events == 100
    first = again.read_batch(max_events=5)
    assert first is not None and first.messages == sent[:5]
    again.ack(first)
    again.close()  # acked part of a segment is not persisted: at-least-once, it comes again
    third = reopen(tmp_path, segment_bytes=4096)
    got = drain(third)
    assert got == sent


def test_torn_last_record_is_skipped_and_everything_before_is_read(tmp_path: Path) -> None:
    spool = reopen(tmp_path)
    sent = [msg(i) for i in range(10)]
    spool.append(sent)
    spool.close()
    (segment,) = tmp_path.glob("*.seg")
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - len(encode_record(sent[-1])) // 2])  # crash mid-write
    again = reopen(tmp_path)
    assert again.pending_events == 9
    assert again.lost_bytes > 0
    assert drain(again) == sent[:9]
    assert list(tmp_path.glob("*.seg")) == []


def test_crc_mismatch_is_detected_and_the_rest_of_the_segment_skipped(tmp_path: Path) -> None:
    spool = reopen(tmp_path)
    sent = [msg(i) for i in range(10)]
    spool.append(sent)
    spool.close()
    (segment,) = tmp_path.glob("*.seg")
    data = bytearray(segment.read_bytes())
    record = len(encode_record(sent[0]))
    data[len(MAGIC) + 4 * record + 40] ^= 0xFF  # flip a bit inside the fifth record's payload
    segment.write_bytes(bytes(data))
    again = reopen(tmp_path)
    assert again.corrupt_segments == 1
    assert drain(again) == sent[:4]


def test_new_process_appends_to_a_new_segment_after_old_ones(tmp_path: Path) -> None:
    old = reopen(tmp_path)
    old.append([msg(i) for i in range(5)])
    old.close()
    new = reopen(tmp_path)
    new.append([msg(i) for i in range(5, 8)])
    assert new.segments == 2
    assert [m.value for m in drain(new)] == [msg(i).value for i in range(8)]


def test_drop_newest_counts_what_does_not_fit(tmp_path: Path) -> None:
    spool = reopen(tmp_path, max_bytes=16384, on_full="drop_newest")
    result = spool.append([msg(i, size=500) for i in range(100)])
    assert spool.size_bytes <= 16384
    written, dropped = sum(result.written.values()), sum(result.dropped.values())
    assert written + dropped == 100 and dropped > 0 and written > 10
    assert [m.value for m in drain(spool)] == [msg(i, size=500).value for i in range(written)]


def test_drop_oldest_keeps_the_newest(tmp_path: Path) -> None:
    spool = reopen(tmp_path, max_bytes=16384, on_full="drop_oldest")
    dropped = 0
    for i in range(0, 100, 5):
        result = spool.append([msg(j, size=500) for j in range(i, i + 5)])
        dropped += sum(result.dropped.values())
    assert spool.size_bytes <= 16384
    got = drain(spool)
    assert dropped > 0 and len(got) + dropped == 100
    assert got[-1].value == msg(99, size=500).value
    assert [m.value for m in got] == [msg(j, size=500).value for j in range(100 - len(got), 100)]


def test_record_bigger_than_the_read_batch_is_read_whole(tmp_path: Path) -> None:
    spool = reopen(tmp_path)
    big = msg(1, size=200_000)
    spool.append([big, msg(2)])
    batch = spool.read_batch(max_bytes=1000)
    assert batch is not None and batch.messages[0] == big


def test_spools_of_workers_that_no_longer_exist_are_adopted(tmp_path: Path) -> None:
    """After a restart with fewer workers, worker-<k> spools (k >= workers) move to worker-<k % workers>."""
    sent = {n: [msg(100 * n + i) for i in range(10)] for n in range(4)}
    for n, messages in sent.items():
        spool = reopen(tmp_path / f"worker-{n}", segment_bytes=600)  # several segments each
        spool.append(messages)
        spool.close()
    (tmp_path / "worker-3" / "not-a-segment.txt").write_text("kept")
    moved = adopt_orphan_spools(tmp_path, workers=2)
    assert moved > 0
    assert not (tmp_path / "worker-2").exists()  # emptied and removed
    assert (tmp_path / "worker-3" / "not-a-segment.txt").exists() and not list((tmp_path / "worker-3").glob("*.seg"))
    assert drain(reopen(tmp_path / "worker-0")) == sent[0] + sent[2]  # its own first, then the orphan's
    assert drain(reopen(tmp_path / "worker-1")) == sent[1] + sent[3]
    assert adopt_orphan_spools(tmp_path, workers=2) == 0
