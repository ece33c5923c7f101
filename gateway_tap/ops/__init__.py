"""Operator commands: ``gateway-tap status``, ``replay`` and ``dlq list|show|replay``.

Each module holds one command's logic; :mod:`.kafka_admin` is the read-only Kafka
inspection they share and :mod:`.targets` says which collector reads which topics.
"""
