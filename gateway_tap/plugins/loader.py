"""Load plugin classes from ``module:Class`` or the ``gateway_tap.plugins`` entry-point group,
validate their config against their JSON Schema, and initialise them."""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import jsonschema

from gateway_tap.config import PluginConfig
from gateway_tap.hooks import ConfigSchemaProvider, GatewayServices, PluginServices
from gateway_tap.plugins.services import MemoryKV

ENTRY_POINT_GROUP = "gateway_tap.plugins"


class PluginLoadError(ValueError):
    """A plugin could not be loaded or its config is invalid; ``problems`` name key paths."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class LoadedPlugin:
    """One configured plugin instance with the services it was given."""

    settings: PluginConfig
    instance: Any
    services: PluginServices

    @property
    def name(self) -> str:
        return self.settings.name


def resolve_class(use: str) -> type[Any]:
    """The class named by ``module:Class`` or by an entry point in group ``gateway_tap.plugins``."""
    if ":" in use:
        module_name, _, attr = use.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    else:
        matches = entry_points(group=ENTRY_POINT_GROUP, name=use)
        if not matches:
            raise LookupError(f"no entry point {use!r} in group {ENTRY_POINT_GROUP!r}")
        obj = next(iter(matches)).load()
    if not inspect.isclass(obj):
        raise TypeError(f"{use!r} is not a class")
    return obj


def _schema_problems(index: int, instance: Any, config: dict[str, Any]) -> list[str]:
    if not isinstance(instance, ConfigSchemaProvider):
        return []
    schema = dict(instance.config_schema())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        problems.append(f"plugins[{index}].config{path}: {err.message}")
    return problems


def _instantiate(settings: list[PluginConfig]) -> tuple[list[tuple[int, PluginConfig, Any]], list[str]]:
    made: list[tuple[int, PluginConfig, Any]] = []
    problems: list[str] = []
    for i, plugin in enumerate(settings):
        if not plugin.enabled:
            continue
        try:
            instance = resolve_class(plugin.use)()
        except Exception as exc:
            problems.append(f"plugins[{i}].use: cannot load {plugin.use!r}: {exc}")
            continue
        found = _schema_problems(i, instance, plugin.config)
        problems += found
        made.append((i, plugin, instance))
    return made, problems


def validate_plugin_configs(settings: list[PluginConfig]) -> list[str]:
    """Problems (by key path) with the plugins section: unloadable classes and configs failing their schema."""
    return _instantiate(settings)[1]


async def load_plugins(settings: list[PluginConfig], gateway: GatewayServices) -> list[LoadedPlugin]:
    """Instantiate, validate and initialise every enabled plugin, sorted by ``order`` (file order breaks ties).

    :raises PluginLoadError: naming each plugin key path that failed.
    """
    made, problems = _instantiate(settings)
    if problems:
        raise PluginLoadError(problems)
    kv_data: dict[str, tuple[Any, float | None]] = {}
    loaded = []
    for i, plugin, instance in sorted(made, key=lambda m: (m[1].order, m[0])):
        logger = logging.getLogger(f"gateway_tap.plugin.{plugin.name}")
        services = PluginServices(MemoryKV(kv_data, plugin.name), logger, gateway)
        init = getattr(instance, "initialize", None)
        if init is not None:
            try:
                await init(plugin.config, services)
            except Exception as exc:
                raise PluginLoadError([f"plugins[{i}]: initialize failed: {exc!r}"]) from exc
        loaded.append(LoadedPlugin(plugin, instance, services))
    return loaded


async def close_plugins(plugins: list[LoadedPlugin]) -> None:
    for plugin in reversed(plugins):
        close = getattr(plugin.instance, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                logging.getLogger(__name__).exception("plugin %s failed to close", plugin.name)
