"""The tap's side of the extension services: plugins' control messages go out through the event publisher.

The services shared with collectors (key-value store, gateway lookups) live in :mod:`gateway_tap.services`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway_tap.services import new_control_message
from schemas import control_headers, control_topic

if TYPE_CHECKING:
    from gateway_tap.publisher import EventPublisher


class ControlChannel:
    """Sends plugins' control messages to ``<prefix>.control`` through the tap's event publisher.

    Messages are keyed by ``gateway_id``, so one tap's messages stay in order within a partition.
    """

    def __init__(self, publisher: EventPublisher, gateway_id: str, prefix: str) -> None:
        self._publisher = publisher
        self._gateway_id = gateway_id
        self._topic = control_topic(prefix)
        self._key = gateway_id.encode()

    def send(self, plugin: str, kind: str, payload: Mapping[str, Any]) -> str:
        """Queue one message (never blocks); returns its id. :raises TypeError: payload is not JSON."""
        message, value = new_control_message(self._gateway_id, plugin, kind, payload)
        self._publisher.publish_message(self._topic, value, self._key, control_headers())
        return message.id
