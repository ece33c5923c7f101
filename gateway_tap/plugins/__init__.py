"""Plugin loading and the hook engine (see :mod:`gateway_tap.hooks` for the SDK)."""

from gateway_tap.plugins.chain import Chain, HookFailed, PluginHook, Step, Stopped, build_chains
from gateway_tap.plugins.loader import LoadedPlugin, PluginLoadError, load_plugins, validate_plugin_configs

__all__ = [
    "Chain",
    "HookFailed",
    "LoadedPlugin",
    "PluginHook",
    "PluginLoadError",
    "Step",
    "Stopped",
    "build_chains",
    "load_plugins",
    "validate_plugin_configs",
]
