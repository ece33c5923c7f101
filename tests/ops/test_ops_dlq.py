"""``gateway-tap dlq list|show|replay`` against the real broker: a real file collector dead-letters
poison events, the commands show why, and a replayed dead letter lands on its original topic with
the same key, value and original headers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from collectors.runtime import build_runtime
from gateway_tap.cli import main
from schemas import topic_for
from tests.support.collectors import analytics, create_topics, produce, produce_events, wait_for, written
from tests.support.ops import RUNNER, ops_config, write_config

NOT_JSON = b"not json"
INVALID = b'{"type": "analytics", "id": "x1"}'


async def end_offset(bootstrap: str, topic: str, partition: int = 0) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()


async def record_at(bootstrap: str, topic: str, partition: int, offset: int) -> object:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        return await asyncio.wait_for(consumer.getone(tp), 30)
    finally:
        await consumer.stop()


def test_dead_letters_are_listed_shown_and_sent_back(tmp_path: Path, kafka_bootstrap: str,
                                                      topic_prefix: str) -> None:
    config_path = write_config(tmp_path, ops_config(tmp_path, kafka_bootstrap, topic_prefix))
    topic = topic_for("analytics", topic_prefix)
    dlq = topic + ".dlq"

    async def dead_letter_two() -> None:
        await create_topics(kafka_bootstrap, topic_prefix)
        await produce(kafka_bootstrap, topic, [NOT_JSON], keys=[b"k1"])
        await produce(kafka_bootstrap, topic, [INVALID], keys=[b"k2"])
        await produce_events(kafka_bootstrap, topic_prefix, analytics(5))
        runtime = build_runtime("file", config_path)
        task = asyncio.create_task(runtime.run())
        await wait_for(lambda: len(written(tmp_path / "files", "analytics")) == 5
                       and asyncio.run(end_offset(kafka_bootstrap, dlq)) == 2, "5 exported and 2 dead letters")
        runtime.request_stop()
        assert await task == 0

    asyncio.run(dead_letter_two())
    args = ["--config", config_path]

    listed = RUNNER.invoke(main, ["dlq", "list", *args])
    assert listed.exit_code == 0, listed.output
    assert f"{dlq}: 2 record(s)" in listed.output and "EventDecodeError" in listed.output
    assert "invalid JSON" in listed.output and f"{topic}[" in listed.output
    as_json = RUNNER.invoke(main, ["dlq", "list", *args, "--topic", dlq, "--json"])
    [listing] = orjson.loads(as_json.output)
    assert listing["count"] == 2 and [e["ref"] for e in listing["last"]] == ["0:0", "0:1"]
    assert all(e["original_topic"] == topic and e["collector"] == "file" for e in listing["last"])
    assert all(e["error_class"] == "EventDecodeError" for e in listing["last"])
    # The two poison events sit on whichever partitions their keys hash to: tell them apart by reason.
    [broken] = [e for e in listing["last"] if "invalid JSON" in e["error"]]
    [invalid] = [e for e in listing["last"] if e is not broken]

    shown = RUNNER.invoke(main, ["dlq", "show", *args, dlq, invalid["ref"]])
    assert shown.exit_code == 0, shown.output
    assert "original_offset" in shown.output and invalid["error"][:40] in shown.output
    assert '"id": "x1"' in shown.output and "key: k2" in shown.output  # pretty-printed JSON value
    assert NOT_JSON.decode() in RUNNER.invoke(main, ["dlq", "show", *args, dlq, broken["ref"]]).output
    missing = RUNNER.invoke(main, ["dlq", "show", *args, dlq, "9"])
    assert missing.exit_code == 1 and "has no entry 0:9" in missing.output

    declined = RUNNER.invoke(main, ["dlq", "replay", *args, dlq, "--offsets", invalid["ref"]], input="n\n")
    assert declined.exit_code == 1 and "nothing sent" in declined.output
    assert RUNNER.invoke(main, ["dlq", "replay", *args, dlq]).exit_code == 2  # neither --offsets nor --all

    sent = RUNNER.invoke(main, ["dlq", "replay", *args, dlq, "--offsets", invalid["ref"], "--yes"])
    assert sent.exit_code == 0, sent.output
    line = next(x for x in sent.output.splitlines() if x.startswith("sent "))
    landed = line.rsplit("-> ", 1)[1]  # topic[partition]@offset
    partition, offset = int(landed.split("[")[1].split("]")[0]), int(landed.rsplit("@", 1)[1])
    assert landed.startswith(topic + "[")
    record = asyncio.run(record_at(kafka_bootstrap, topic, partition, offset))
    assert record.value == INVALID and record.key == b"k2"  # type: ignore[attr-defined]
    assert list(record.headers) == [("type", b"x")]  # type: ignore[attr-defined]  # ours stripped
