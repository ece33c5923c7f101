"""Plugin loading and the hook chain (see :mod:`gateway_tap.hooks` for the SDK)."""

from gateway_tap.plugins.chain import BoundHook, Chain, HookFailed, build_chains
from gateway_tap.plugins.loader import LoadedPlugin, PluginLoadError, load_plugins, validate_plugin_configs

__all__ = [
    "BoundHook",
    "Chain",
    "HookFailed",
    "LoadedPlugin",
    "PluginLoadError",
    "build_chains",
    "load_plugins",
    "validate_plugin_configs",
]
