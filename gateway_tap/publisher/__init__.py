"""Non-blocking Kafka event publishing with a durable disk spool (see :mod:`.publisher`; settings:
:class:`gateway_tap.settings.PublisherSettings`)."""

from gateway_tap.publisher.publisher import EventPublisher
from gateway_tap.publisher.spool import Message, Spool

__all__ = ["EventPublisher", "Message", "Spool"]
