"""Collectors: the SDK plugin authors subclass, the runtime that runs them, and the built-in sinks."""

from collectors.sdk import (
    BadEvent,
    BadEvents,
    CollectorError,
    CollectorServices,
    ConfigError,
    DataCollector,
    Partition,
    Positions,
    RetryLater,
)

__all__ = [
    "BadEvent",
    "BadEvents",
    "CollectorError",
    "CollectorServices",
    "ConfigError",
    "DataCollector",
    "Partition",
    "Positions",
    "RetryLater",
]
