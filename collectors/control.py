"""Control messages a collector sends (``services.send_to_control``), e.g. an alert raised from a batch.

A collector has no spool: its messages go out through the runtime's own producer (``acks=all``),
and the runtime waits for them (:meth:`ControlOutbox.drain`) after the sink's ``flush`` and
before it commits the batch. So a message sent while a batch was handled is acknowledged before
that batch counts as done; if it could not be sent, the batch is retried like a sink failure and
the message is sent again (at-least-once: a consumer of ``<prefix>.control`` may see it twice).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from collectors.sdk import RetryLater
from gateway_tap.services import new_control_message
from schemas import control_headers, control_topic

log = logging.getLogger(__name__)

SendFn = Callable[[str, bytes, bytes, list[tuple[str, bytes]]], Awaitable[Awaitable[Any]]]
"""``(topic, value, key, headers)`` -> a future of the broker's acknowledgement (aiokafka's ``send``)."""


class ControlOutbox:
    """Queues a collector's control messages without blocking and sends them once a producer is attached.

    :param gateway_id: the envelope's ``gateway_id`` (and the message key): ``collector/<instance>``.
    :param prefix: the topic prefix (messages go to ``<prefix>.control``).
    :param max_pending_messages: bound on messages not yet acknowledged; past it ``send`` raises.
    """

    def __init__(self, gateway_id: str, prefix: str, max_pending_messages: int = 10_000) -> None:
        self.gateway_id = gateway_id
        self.topic = control_topic(prefix)
        self._key = gateway_id.encode()
        self._headers = control_headers()
        self.max_pending_messages = max_pending_messages
        self._unsent: list[bytes] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._send_fn: SendFn | None = None

    @property
    def pending(self) -> int:
        """Messages queued or in flight, not yet acknowledged."""
        return len(self._unsent) + len(self._in_flight)

    def send(self, plugin: str, kind: str, payload: Mapping[str, Any]) -> str:
        """Queue one message (never blocks); returns its id.

        :raises TypeError: ``payload`` is not JSON-serialisable.
        :raises OverflowError: ``max_pending_messages`` are already waiting for the broker.
        """
        if self.pending >= self.max_pending_messages:
            raise OverflowError(f"{self.pending} control messages are waiting for Kafka (max_pending_messages)")
        message, value = new_control_message(self.gateway_id, plugin, kind, payload)
        self._unsent.append(value)
        if self._send_fn is not None:
            self._start_sends()
        return message.id

    def attach(self, send_fn: SendFn) -> None:
        """Start sending through ``send_fn`` (the runtime's producer, once started): queued messages go first."""
        self._send_fn = send_fn
        self._start_sends()

    def detach(self) -> None:
        """Stop sending (the producer is stopping); what is unsent stays queued."""
        self._send_fn = None

    async def drain(self) -> None:
        """Wait until every message sent so far is acknowledged.

        :raises RetryLater: a message was not acknowledged; it stays queued and goes out again at the next
            drain (the runtime retries the batch, so the collector may send it once more as well).
        """
        self._start_sends()
        if not self._in_flight:
            return
        results = await asyncio.gather(*self._in_flight, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures or self._unsent:
            raise RetryLater(f"{max(len(failures), len(self._unsent))} control message(s) not acknowledged by Kafka: "
                             f"{failures[0] if failures else 'no producer'}")

    def _start_sends(self) -> None:
        if self._send_fn is None or not self._unsent:
            return
        values, self._unsent = self._unsent, []
        for value in values:
            task = asyncio.ensure_future(self._send_one(self._send_fn, value))
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    async def _send_one(self, send_fn: SendFn, value: bytes) -> None:
        try:
            ack = await send_fn(self.topic, value, self._key, self._headers)
            await ack
        except BaseException:
            self._unsent.append(value)  # sent again at the next drain; a duplicate is harmless, a loss is not
            raise

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("control message to %s not acknowledged yet (%s); it is sent again", self.topic, exc)
