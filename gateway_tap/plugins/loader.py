"""Load plugin classes from ``module:Class`` or the ``gateway_tap.plugins`` entry-point group,
check their hooks and endpoints, validate their config against their JSON Schema, and initialise them.

No silent plugins: a class that does nothing the tap can attach, a hook method with the wrong
arity, a plain ``def`` where ``async def`` is required, or an invalid endpoint declaration is a
load error naming ``plugins[i]``, the method and what is expected (``check-config`` and ``serve``).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from aiohttp import hdrs, web

from gateway_tap.hooks import (
    ControlSink,
    Endpoint,
    GatewayServices,
    KeyValueStore,
    PluginServices,
)
from gateway_tap.plugins.redis_kv import RedisKV
from gateway_tap.plugins.shared_kv import SharedKVStore
from gateway_tap.redis_link import RedisLink
from gateway_tap.services import MemoryKV
from gateway_tap.settings import PluginConfig
from gateway_tap.settings.extension import check_extension_config

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
    endpoints: tuple[Endpoint, ...] = field(default=())
    """What ``endpoints()`` declared (checked; read once per instance, right after the constructor)."""

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


HOOKS: dict[str, tuple[str, ...]] = {
    "pre_auth": ("request", "ctx"),
    "authenticate": ("request", "ctx"),
    "post_auth": ("request", "ctx"),
    "on_response_headers": ("response", "ctx"),
    "on_response_body": ("response", "body", "ctx"),
    "on_stream_event": ("event", "ctx"),
    "on_response_chunk": ("chunk", "ctx"),
    "on_response_end": ("ctx",),
}
"""Each hook method (``async def``) and the arguments the tap calls it with."""
LIFECYCLE: dict[str, tuple[str, ...]] = {"initialize": ("config", "services"), "close": (),
                                         "on_config_change": ("config",), "health": ()}
"""Optional ``async def`` lifecycle methods and their arguments."""
DECLARATIONS = ("endpoints", "config_schema")
"""Plain ``def`` methods without arguments, read at load (``config_schema`` may also be a dict, as on a
``DataCollector``)."""
ENDPOINT_HANDLER_ARGS = ("request", "ctx")
_HTTP_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


async def routed(request: web.Request) -> web.StreamResponse:
    """The handler aiohttp's router holds for every plugin endpoint: the tap looks the route up and calls the
    endpoint's own ``handler(request, ctx)`` itself."""
    raise web.HTTPNotImplemented()


def route_path(plugin: str, path: str) -> str:
    """The aiohttp route pattern an endpoint of ``plugin`` is served at: ``/plugins/{plugin}/{path}``."""
    return f"/plugins/{plugin}/{path.lstrip('/')}"


_ARG_NAMES: dict[str, frozenset[str]] = {
    "request": frozenset({"request", "req"}), "response": frozenset({"response", "resp", "res"}),
    "body": frozenset({"body"}), "event": frozenset({"event", "evt"}), "chunk": frozenset({"chunk"}),
    "ctx": frozenset({"ctx", "context"}), "config": frozenset({"config", "cfg", "conf"}),
    "services": frozenset({"services", "service", "svc"}),
}
"""The names a parameter for each argument the tap passes is commonly given: a parameter named for one argument
in the place of another is a method written for another order (the seed's ``post_auth(ctx, req)``)."""


def _arity_problem(fn: Any, args: tuple[str, ...]) -> str | None:
    """Why ``fn`` cannot be called with ``len(args)`` positional arguments in the order ``args``, or None."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # a builtin or C callable: nothing to inspect
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    kw_required = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if kw_required:
        return f"has required keyword-only argument(s) {', '.join(kw_required)}"
    if len(required) > len(args) or (len(positional) < len(args) and not varargs):
        shown = ", ".join(p.name for p in positional) or "no arguments"
        return f"takes ({shown}), {len(required)} required"
    for j, param in enumerate(positional[:len(args)]):
        named = next((a for a in args if param.name.lstrip("_") in _ARG_NAMES.get(a, ())), args[j])
        if named != args[j]:
            shown = ", ".join(p.name for p in positional)
            return f"takes ({shown}): {param.name!r} is where the tap passes {args[j]!r} (arguments in another order)"
    return None


def _takes_arguments(fn: Any) -> bool:
    """True when ``fn`` has a required argument (it cannot be called as ``fn()``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               for p in params)


def health_check(instance: Any) -> Any:
    """The plugin's ``async def health(self)``, or None (none, or a ``health(request, ctx)`` endpoint handler)."""
    fn = getattr(instance, "health", None)
    return fn if fn is not None and inspect.iscoroutinefunction(fn) and not _takes_arguments(fn) else None


def _signature(name: str, args: tuple[str, ...], is_async: bool) -> str:
    return f"{'async def' if is_async else 'def'} {name}(self{''.join(', ' + a for a in args)})"


def _method_problems(where: str, instance: Any) -> list[str]:
    """Hooks, lifecycle and declarations that exist but cannot be called as the tap calls them."""
    problems = []
    for name, args, is_async in [*((n, a, True) for n, a in HOOKS.items()),
                                 *((n, a, True) for n, a in LIFECYCLE.items()),
                                 *((n, (), False) for n in DECLARATIONS)]:
        fn = getattr(instance, name, None)
        if fn is None or (name == "config_schema" and isinstance(fn, Mapping)):  # a collector's dict: also fine
            continue
        if name == "health" and _takes_arguments(fn):  # an endpoint handler named health, not the health check
            continue
        expected = _signature(name, args, is_async)
        if not callable(fn):
            problems.append(f"{where}.{name}: is a {type(fn).__name__}, not a method; expected {expected}")
        elif is_async and not inspect.iscoroutinefunction(fn):
            problems.append(f"{where}.{name}: is a plain def; expected {expected}")
        elif not is_async and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            problems.append(f"{where}.{name}: is an async def; expected {expected} (read once, at load)")
        elif (why := _arity_problem(fn, args)) is not None:
            problems.append(f"{where}.{name}: {why}; expected {expected}")
    return problems


def declared_endpoints(where: str, plugin: str, instance: Any) -> tuple[tuple[Endpoint, ...], list[str]]:
    """The endpoints ``instance`` declares, checked: methods, path patterns (aiohttp's route syntax), handlers,
    options, duplicates. Returns them normalised (upper-case method, no leading ``/``) with the problems."""
    declare = getattr(instance, "endpoints", None)
    if declare is None or not callable(declare) or inspect.iscoroutinefunction(declare):
        return (), []  # reported by _method_problems
    try:
        declared = declare()
    except Exception as exc:
        return (), [f"{where}.endpoints(): raised {exc!r}"]
    if not isinstance(declared, (list, tuple)):
        return (), [f"{where}.endpoints(): returned {type(declared).__name__}; expected a list of Endpoint"]
    router = web.UrlDispatcher()  # the same route syntax and conflict rules the tap serves them with
    out: list[Endpoint] = []
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for j, endpoint in enumerate(declared):
        at = f"{where}.endpoints()[{j}]"
        if not isinstance(endpoint, Endpoint):
            problems.append(f"{at}: is a {type(endpoint).__name__}; expected Endpoint(method, path, handler)")
            continue
        method = endpoint.method.upper()
        path = endpoint.path.lstrip("/")
        label = f"{method} {path or '/'}"
        if method != hdrs.METH_ANY and not (method and set(method) <= _HTTP_TOKEN):
            problems.append(f"{at}: method {endpoint.method!r} is not an HTTP method (or '*' for any)")
            continue
        handler = endpoint.handler
        expected = "async def handler(request, ctx) -> web.StreamResponse"
        if not callable(handler):
            problems.append(f"{at} ({label}): handler is a {type(handler).__name__}; expected {expected}")
            continue
        if not inspect.iscoroutinefunction(handler):
            problems.append(f"{at} ({label}): handler {getattr(handler, '__name__', handler)!r} is a plain def; "
                            f"expected {expected}")
            continue
        if (why := _arity_problem(handler, ENDPOINT_HANDLER_ARGS)) is not None:
            problems.append(f"{at} ({label}): handler {getattr(handler, '__name__', handler)!r} {why}; "
                            f"expected {expected}")
            continue
        if endpoint.timeout_ms is not None and not endpoint.timeout_ms > 0:
            problems.append(f"{at} ({label}): timeout_ms must be > 0 (or None for the plugin's timeout_ms)")
            continue
        if endpoint.on_error not in (None, "fail_closed", "fail_open"):
            problems.append(f"{at} ({label}): on_error must be 'fail_closed' or 'fail_open' (or None for the "
                            f"plugin's on_error)")
            continue
        if (method, path) in seen:
            problems.append(f"{at}: {label} is declared twice")
            continue
        try:
            router.add_route(method, route_path(plugin, path), routed)
        except (ValueError, RuntimeError) as exc:
            problems.append(f"{at}: path {endpoint.path!r} is not a valid route pattern: {exc}")
            continue
        seen.add((method, path))
        out.append(Endpoint(method, path, handler, public=endpoint.public, timeout_ms=endpoint.timeout_ms,
                            on_error=endpoint.on_error))
    return tuple(out), problems


def _capability_problems(where: str, plugin: PluginConfig, instance: Any) -> list[str]:
    """No silent plugins: something the tap attaches (a hook or endpoints) or ``initialize`` must exist (for a
    collector, whose ``initialize`` serves ``gateway-tap collect``, a hook or endpoints)."""
    attached = any(getattr(instance, name, None) is not None for name in (*HOOKS, "endpoints"))
    if not attached and callable(getattr(instance, "handle_raw_batch", None)):  # a DataCollector, seen structurally
        return [f"{where}: {plugin.use!r} is a collector without a hook or endpoints: it would do nothing in the tap; "
                f"run it with gateway-tap collect, or define a hook to use it as a plugin too"]
    if attached or getattr(instance, "initialize", None) is not None:
        problems = _method_problems(where, instance)
        if getattr(instance, "on_response_end", None) is not None and getattr(instance, "on_response_chunk",
                                                                              None) is None:
            problems.append(f"{where}.on_response_end: without on_response_chunk there is nothing it could have "
                            f"held back; expected async def on_response_chunk(self, chunk, ctx) beside it")
        return problems
    return [f"{where}: {plugin.use!r} implements no capability: define at least one of "
            f"{', '.join(_signature(n, a, True) for n, a in HOOKS.items())}, def endpoints(self) or "
            f"async def initialize(self, config, services)"]


_Made = tuple[int, PluginConfig, Any, tuple[Endpoint, ...]]


def _instantiate(settings: list[PluginConfig], running: Mapping[str, LoadedPlugin] | None = None,
                 ) -> tuple[list[_Made], list[str]]:
    made: list[_Made] = []
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
        where = f"plugins[{i}] ({plugin.name})"
        checked = _capability_problems(where, plugin, instance)
        endpoints: tuple[Endpoint, ...] = ()
        if not checked:
            endpoints, checked = declared_endpoints(where, plugin.name, instance)
        if checked:
            problems += checked
            continue
        config, invalid = check_extension_config(instance, plugin.config, f"plugins[{i}].config")
        problems += invalid
        made.append((i, plugin.model_copy(update={"config": config}), instance, endpoints))
    return made, problems


def effective_plugin_configs(settings: list[PluginConfig]) -> tuple[list[PluginConfig], list[str]]:
    """The plugins section as the tap applies it, and the problems (by key path) that keep it from loading.

    Each enabled plugin is instantiated and checked as at start-up (its class loads, its hooks can be called as
    the tap calls them, it does something, its endpoints are valid), and its ``config`` is validated against its
    declaration (``Config`` model or ``config_schema``) with the schema's defaults filled in
    (:func:`~gateway_tap.settings.extension.check_extension_config`): the returned entries carry the config
    ``initialize`` / ``on_config_change`` and ``ctx.config`` would get. Disabled plugins are left out.
    ``serve``, ``check-config``, reloads and the admin API's checks all go through this.
    """
    made, problems = _instantiate(settings)
    return [plugin for _, plugin, _, _ in made], problems


def validate_plugin_configs(settings: list[PluginConfig]) -> list[str]:
    """Problems (by key path) with the plugins section: unloadable classes, hooks that cannot be called as the
    tap calls them, plugins that do nothing, invalid endpoint declarations and configs failing their schema
    (:func:`effective_plugin_configs` without the configs)."""
    return _instantiate(settings)[1]


TRIAL_TIMEOUT_S = 10.0
"""Longest a trial's ``initialize`` may take (:func:`trial_plugin`)."""


async def trial_plugin(plugin: PluginConfig, gateway: GatewayServices) -> list[str]:
    """Load ``plugin`` as a reload would load it fresh, without putting it anywhere: the class and its checks,
    its config schema, then its own ``initialize(config, services)`` on a new instance with a scratch
    key-value store and a control channel that drops what it is sent; the instance is closed again.

    This is how a config is validated exactly as the tap will apply it (the admin API, before storing a
    change): the plugin's own checks in ``initialize`` run too. Problems are by key path (``plugins[0]`` is
    this plugin), ``plugins[0].config: <the plugin's message>`` when ``initialize`` refused the config.
    """
    made, problems = _instantiate([plugin.model_copy(update={"enabled": True})])  # checked even while disabled
    if problems or not made:
        return problems
    _, effective, instance, _ = made[0]  # the config with its schema's defaults, as initialize gets it
    init = getattr(instance, "initialize", None)
    if init is None:
        return []
    services = PluginServices(MemoryKV({}, plugin.name), logging.getLogger(f"gateway_tap.plugin.{plugin.name}"),
                              gateway, plugin.name, lambda plugin, kind, payload: "trial")
    try:
        async with asyncio.timeout(TRIAL_TIMEOUT_S):
            await init(effective.config, services)
    except TimeoutError:
        problems = [f"plugins[0]: initialize did not finish within {TRIAL_TIMEOUT_S:g} s"]
    except Exception as exc:
        problems = [f"plugins[0].config: {exc}"]
    await close_plugins([LoadedPlugin(effective, instance, services)])
    return problems


async def load_plugins(settings: list[PluginConfig], gateway: GatewayServices, *, control: ControlSink | None = None,
                       shared_kv: SharedKVStore | None = None, previous: Sequence[LoadedPlugin] = (),
                       kv_data: dict[str, tuple[Any, float | None]] | None = None,
                       redis: RedisLink | None = None) -> list[LoadedPlugin]:
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
    :param redis: the worker's Redis link, for plugins with ``kv.backend: redis`` (required by them).
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
        for i, plugin, instance, endpoints in sorted(made, key=lambda m: (m[1].order, m[0])):
            old = running.get(plugin.name)
            if old is not None and old.instance is instance:
                if plugin.kv == old.settings.kv and (plugin.config == old.settings.config
                                                     or hasattr(instance, "on_config_change")):
                    item = LoadedPlugin(plugin, instance, old.services, old.endpoints)
                    loaded.append(item)
                    if plugin.config != old.settings.config:
                        notify.append((i, old, item))
                    continue
                instance = type(instance)()
                endpoints = declared_endpoints(f"plugins[{i}] ({plugin.name})", plugin.name, instance)[0]
            logger = logging.getLogger(f"gateway_tap.plugin.{plugin.name}")
            kv: KeyValueStore = MemoryKV(kv_data, plugin.name)
            if plugin.kv.backend == "shared" and shared_kv is not None:
                kv = shared_kv.namespace(plugin.name, plugin.kv.max_bytes)
            elif plugin.kv.backend == "redis":
                if redis is None:
                    raise PluginLoadError([f"plugins[{i}].kv.backend: redis is not connected in this tap (a plugin "
                                           "that starts using it on a reload needs a restart)"])
                kv = RedisKV(redis, plugin.name, plugin.kv.max_bytes)
            services = PluginServices(kv, logger, gateway, plugin.name, control)
            init = getattr(instance, "initialize", None)
            if init is not None:
                try:
                    await init(plugin.config, services)
                except Exception as exc:
                    raise PluginLoadError([f"plugins[{i}]: initialize failed: {exc!r}"]) from exc
            item = LoadedPlugin(plugin, instance, services, endpoints)
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


async def plugins_health(plugins: Sequence[LoadedPlugin]) -> dict[str, str | None]:
    """Each plugin with ``health()``: None when it is ready, else why not (it answered False, raised, or took
    longer than its ``timeout_ms``, also without yielding). Called concurrently; what ``/readyz`` reports."""
    checked = [p for p in plugins if health_check(p.instance) is not None]
    return dict(zip([p.name for p in checked], await asyncio.gather(*map(_health, checked)), strict=True))


async def _health(plugin: LoadedPlugin) -> str | None:
    timeout_s = plugin.settings.timeout_ms / 1000
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            ready = await health_check(plugin.instance)()
    except TimeoutError:
        return f"health() timed out after {plugin.settings.timeout_ms:.0f} ms"
    except Exception as exc:
        return f"health() raised {exc!r}"
    elapsed = time.perf_counter() - start
    if elapsed > timeout_s:
        return f"health() ran {elapsed * 1000:.0f} ms without giving the event loop back (timeout_ms " \
               f"{plugin.settings.timeout_ms:.0f})"
    return "health() answered False" if ready is False else None


async def close_plugins(plugins: list[LoadedPlugin]) -> None:
    for plugin in reversed(plugins):
        close = getattr(plugin.instance, "close", None)
        if close is not None:
            try:
                await close()
            except Exception:
                logging.getLogger(__name__).exception("plugin %s failed to close", plugin.name)
