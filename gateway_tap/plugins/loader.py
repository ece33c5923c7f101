"""Load plugin classes from ``module:Class`` or the ``gateway_tap.plugins`` entry-point group,
validate their config against their JSON Schema, and initialise them."""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import jsonschema

from gateway_tap.hooks import ConfigSchemaProvider, ControlSink, GatewayServices, KeyValueStore, PluginServices
from gateway_tap.plugins.services import MemoryKV
from gateway_tap.plugins.shared_kv import SharedKVStore
from gateway_tap.settings import PluginConfig

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


def _instantiate(settings: list[PluginConfig], running: Mapping[str, LoadedPlugin] | None = None,
                 ) -> tuple[list[tuple[int, PluginConfig, Any]], list[str]]:
    made: list[tuple[int, PluginConfig, Any]] = []
    problems: list[str] = []
    for i, plugin in enumerate(settings):
        if not plugin.enabled:
            continue
        old = running.get(plugin.name) if running else None
        try:
            # A running plugin of the same class validates its new config itself (no throwaway instance).
            instance = old.instance if old is not None and old.settings.use == plugin.use else \
                resolve_class(plugin.use)()
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


async def load_plugins(settings: list[PluginConfig], gateway: GatewayServices, *, control: ControlSink | None = None,
                       shared_kv: SharedKVStore | None = None, previous: Sequence[LoadedPlugin] = (),
                       kv_data: dict[str, tuple[Any, float | None]] | None = None) -> list[LoadedPlugin]:
    """Instantiate, validate and initialise every enabled plugin, sorted by ``order`` (file order breaks ties).

    :param control: where ``services.send_to_control`` goes (the tap's :class:`ControlChannel`).
    :param shared_kv: the store of plugins with ``kv.backend: shared``; without it they get a memory store.
    :param previous: on a configuration reload, the plugins in force. One with the same ``name``, ``use`` and
        ``kv`` keeps its instance and services (so its state) when its ``config`` is unchanged (``order``,
        ``llms``, ``timeout_ms`` and ``on_error`` may change); when its ``config`` changed it is told through
        ``on_config_change(config)`` if it has that method, else a fresh instance is initialised in its place
        (the caller closes the old one once no request uses it any more). When this raises, nothing in force
        changed: fresh instances are closed again and notified plugins get their old config back.
    :param kv_data: the backing of the memory key-value stores; pass the same dict on reloads so a
        re-initialised plugin finds its keys.
    :raises PluginLoadError: naming each plugin key path that failed.
    """
    running = {p.name: p for p in previous}
    made, problems = _instantiate(settings, running)
    if problems:
        raise PluginLoadError(problems)
    kv_data = {} if kv_data is None else kv_data
    loaded: list[LoadedPlugin] = []
    fresh: list[LoadedPlugin] = []
    notify: list[tuple[int, LoadedPlugin, LoadedPlugin]] = []
    try:
        for i, plugin, instance in sorted(made, key=lambda m: (m[1].order, m[0])):
            old = running.get(plugin.name)
            if old is not None and old.instance is instance:
                if plugin.kv == old.settings.kv and (plugin.config == old.settings.config
                                                     or hasattr(instance, "on_config_change")):
                    item = LoadedPlugin(plugin, instance, old.services)
                    loaded.append(item)
                    if plugin.config != old.settings.config:
                        notify.append((i, old, item))
                    continue
                instance = type(instance)()
            logger = logging.getLogger(f"gateway_tap.plugin.{plugin.name}")
            kv: KeyValueStore = MemoryKV(kv_data, plugin.name)
            if plugin.kv.backend == "shared" and shared_kv is not None:
                kv = shared_kv.namespace(plugin.name, plugin.kv.max_bytes)
            services = PluginServices(kv, logger, gateway, plugin.name, control)
            init = getattr(instance, "initialize", None)
            if init is not None:
                try:
                    await init(plugin.config, services)
                except Exception as exc:
                    raise PluginLoadError([f"plugins[{i}]: initialize failed: {exc!r}"]) from exc
            item = LoadedPlugin(plugin, instance, services)
            fresh.append(item)
            loaded.append(item)
        await _notify_config_change(notify)
    except BaseException:
        await close_plugins(fresh)
        raise
    return loaded


async def _notify_config_change(notify: list[tuple[int, LoadedPlugin, LoadedPlugin]]) -> None:
    """Call ``on_config_change`` in turn; when one fails, give those already told their old config back."""
    told: list[LoadedPlugin] = []
    for i, old, item in notify:
        try:
            await item.instance.on_config_change(item.settings.config)
        except Exception as exc:
            for back in reversed(told):
                try:
                    await back.instance.on_config_change(back.settings.config)
                except Exception:
                    logging.getLogger(__name__).exception("plugin %s failed to take its config back", back.name)
            raise PluginLoadError([f"plugins[{i}].config: on_config_change failed: {exc!r}"]) from exc
        told.append(old)


async def close_plugins(plugins: list[LoadedPlugin]) -> None:
    for plugin in reversed(plugins):
        close = getattr(plugin.instance, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                logging.getLogger(__name__).exception("plugin %s failed to close", plugin.name)
