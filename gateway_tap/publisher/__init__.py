"""Non-blocking Kafka event publishing with a durable disk spool (see :mod:`.publisher`)."""

from gateway_tap.publisher.publisher import EventPublisher
from gateway_tap.publisher.settings import PublisherSettings
from gateway_tap.publisher.spool import Message, Spool

__all__ = ["EventPublisher", "Message", "PublisherSettings", "Spool"]
