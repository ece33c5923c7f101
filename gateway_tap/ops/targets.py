"""Which collectors exist, which consumer group each one is, and which topics it reads."""

from __future__ import annotations

from dataclasses import dataclass

from collectors.registry import DEFAULT_COLLECTORS, resolve_collector
from collectors.sdk import ConfigError
from gateway_tap.settings import CollectorSettings, GatewayConfig, group_id_for
from schemas import EVENT_TYPES, EventType, topic_for


@dataclass(frozen=True, slots=True)
class CollectorTarget:
    """One collector NAME as the runtime would run it.

    ``error`` is set when its class cannot be loaded; ``event_types`` then falls back to
    every event type so its group's lag is still reported.
    """

    name: str
    group_id: str
    event_types: tuple[EventType, ...]
    topics: tuple[str, ...]
    error: str | None = None


def collector_target(config: GatewayConfig, name: str) -> CollectorTarget:
    """The target for NAME (``collectors.<NAME>`` settings, or defaults for a built-in)."""
    settings = config.collectors.get(name) or CollectorSettings.model_validate({})
    error = None
    try:
        types = tuple(resolve_collector(settings.plugin or name).consumed_types())
    except ConfigError as exc:
        types, error = tuple(EVENT_TYPES), str(exc)
    prefix = config.kafka.topic_prefix
    return CollectorTarget(name, group_id_for(name, settings, prefix), types,
                           tuple(topic_for(t, prefix) for t in types), error)


def collector_targets(config: GatewayConfig) -> list[CollectorTarget]:
    """The default built-ins (configured or not: one that never ran shows every event behind), then every
    other NAME under ``collectors:``. An opt-in built-in (lake, otlp) is listed only when configured, so a
    deployment without it does not see its group as forever behind."""
    names = list(DEFAULT_COLLECTORS) + [n for n in config.collectors if n not in DEFAULT_COLLECTORS]
    return [collector_target(config, name) for name in names]
