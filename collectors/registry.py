"""Resolve a collector NAME to its class: a built-in, an entry point, or ``module:Class``."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from collectors.sdk import ConfigError, DataCollector

ENTRY_POINT_GROUP = "gateway_tap.collectors"
BUILTINS: dict[str, str] = {
    "file": "collectors.sinks.file:FileCollector",
    "elasticsearch": "collectors.sinks.elasticsearch:ElasticsearchCollector",
    "budget": "collectors.sinks.budget:BudgetCollector",
    "lake": "collectors.sinks.lake.collector:LakeCollector",
    "otlp": "collectors.sinks.otlp:OtlpCollector",
    "otlp_content": "collectors.sinks.otlp:OtlpContentCollector",
}
DEFAULT_COLLECTORS = ("file", "elasticsearch", "budget")
"""The built-ins every deployment we ship runs (docker-compose's default profile, ``gateway-tap up``); the others
are opt-in (the lake needs a destination, otlp a receiver)."""


def _load(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import collector module {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None


def resolve_collector(name: str) -> type[DataCollector]:
    """The :class:`DataCollector` subclass that ``name`` designates.

    Lookup order: built-in name, entry point of group ``gateway_tap.collectors``, ``module:Class``.

    :raises ConfigError: nothing matches, the import fails, or the object is not a DataCollector.
    """
    if name in BUILTINS:
        obj = _load(BUILTINS[name])
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if found:
            obj = found[0].load()
        elif ":" in name:
            obj = _load(name)
        else:
            raise ConfigError(f"unknown collector {name!r}: not a built-in ({', '.join(BUILTINS)}), "
                              f"not an entry point of group {ENTRY_POINT_GROUP}, and not module:Class")
    if not (isinstance(obj, type) and issubclass(obj, DataCollector)):
        raise ConfigError(f"{name!r} is {obj!r}, not a DataCollector subclass")
    if not obj.consumed_types() and not obj.consumes_control():
        raise ConfigError(f"{name!r} consumes no event type: declare event_types or override a handler")
    return obj
