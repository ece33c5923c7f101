"""The real test bed answers: Kafka round trip of each event type, Elasticsearch index+search,
PostgreSQL query, and the mock upstream through the official SDKs."""

from __future__ import annotations

import asyncio

import anthropic
import asyncpg
import openai
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from elasticsearch import AsyncElasticsearch

from schemas import EVENT_TYPES, decode_event, encode_event, message_headers, message_key, topic_for
from tests.support.events import sample_events


async def test_each_event_type_round_trips_through_the_broker(kafka_bootstrap: str, topic_prefix: str) -> None:
    events = sample_events()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(topic_for(event.type, topic_prefix), encode_event(event),
                                         key=message_key(event), headers=message_headers(event))
    finally:
        await producer.stop()
    topics = [topic_for(t, topic_prefix) for t in EVENT_TYPES]
    consumer = AIOKafkaConsumer(*topics, bootstrap_servers=kafka_bootstrap, group_id=f"{topic_prefix}-g",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(30):
            while len(received) < len(events):
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for record in records:
                        headers = dict(record.headers)
                        event = decode_event(record.value, expected_type=headers["type"].decode())
                        assert headers["schema_version"] == b"1"
                        received.append(event)
    finally:
        await consumer.stop()
    assert sorted(e.id for e in received) == sorted(e.id for e in events)
    assert {e.type for e in received} == set(EVENT_TYPES)


async def test_elasticsearch_index_and_search(es_url: str, topic_prefix: str) -> None:
    es = AsyncElasticsearch(es_url)
    index = f"{topic_prefix}-analytics"
    try:
        event = sample_events()[2]
        await es.index(index=index, id=event.id, document=orjson.loads(encode_event(event)), refresh=True)
        await es.index(index=index, id=event.id, document=orjson.loads(encode_event(event)), refresh=True)
        found = await es.search(index=index, query={"term": {"model.keyword": "gpt-4o-mini"}})
        assert found["hits"]["total"]["value"] == 1
        assert found["hits"]["hits"][0]["_id"] == event.id
    finally:
        await es.options(ignore_status=404).indices.delete(index=index)
        await es.close()


async def test_postgres_round_trip(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT current_database()") == pg_dsn.rsplit("/", 1)[1]
        assert await conn.fetchval("SELECT 40 + 2") == 42
    finally:
        await conn.close()


async def test_mock_upstream_speaks_openai_and_anthropic(mock_llm: str) -> None:
    oai = openai.AsyncOpenAI(base_url=f"{mock_llm}/v1", api_key="x")
    resp = await oai.chat.completions.create(model="gpt-4o-mini", max_tokens=5,
                                             messages=[{"role": "user", "content": "12345678"}])
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (2, 5)
    stream = await oai.chat.completions.create(model="gpt-4o-mini", max_tokens=3, stream=True,
                                               stream_options={"include_usage": True},
                                               messages=[{"role": "user", "content": "hi"}])
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    ant = anthropic.AsyncAnthropic(base_url=mock_llm, api_key="x")
    msg = await ant.messages.create(model="claude-haiku-4-5", max_tokens=4,
                                    messages=[{"role": "user", "content": "hello there"}])
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (2, 4)
    async with ant.messages.stream(model="claude-haiku-4-5", max_tokens=4,
                                   messages=[{"role": "user", "content": "hi"}]) as s:
        final = await s.get_final_message()
    assert final.usage.output_tokens == 4
    try:
        await oai.with_options(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], extra_headers={"x-mock-status": "503"})
    except openai.InternalServerError as exc:
        assert exc.status_code == 503
    else:
        raise AssertionError("injected 503 did not surface")
