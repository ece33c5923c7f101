#!/usr/bin/env bash
# One-shot job: create the event topics, the edge-to-control topic and their dead-letter
# topics (idempotent).
# Partitions cap how many members of one collector group can work in parallel, so
# create enough up front; raise later with `kafka-topics.sh --alter --partitions N`.
set -euo pipefail
bootstrap=${KAFKA_BOOTSTRAP:-kafka:9092}
partitions=${KAFKA_PARTITIONS:-12}
prefix=${TOPIC_PREFIX:-gateway}
topics=/opt/kafka/bin/kafka-topics.sh

for stream in proxy_logs analytics budget_usage control; do
  "$topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$prefix.$stream" --partitions "$partitions" --replication-factor 1 \
    --config retention.ms=604800000
  # Dead letters are rare and inspected by hand: few partitions, kept for 30 days.
  "$topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
    --topic "$prefix.$stream.dlq" --partitions 3 --replication-factor 1 \
    --config retention.ms=2592000000
done
"$topics" --bootstrap-server "$bootstrap" --describe --topic "$prefix\..*" | grep -E '^Topic:' || true
