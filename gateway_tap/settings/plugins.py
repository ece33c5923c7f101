"""``plugins``: the hook chain, one entry per plugin instance."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from gateway_tap.settings.base import Id, Section


class PluginKVSettings(Section):
    """Which key-value store ``services.kv`` is for this plugin."""

    backend: Literal["memory", "shared", "redis"] = Field(
        default="memory",
        description="memory: a dict per worker process (fastest, not shared, lost on restart); shared: the SQLite "
                    "file tap.shared_kv_path, shared by the tap's worker processes; redis: the redis section's "
                    "server, shared by every worker of every tap.")
    max_bytes: int = Field(default=64 * 1024 * 1024, gt=0,
                           description="shared: bound on this plugin's keys + values (the oldest entries are evicted "
                                       "to make room); redis: the largest single entry (the server's maxmemory "
                                       "policy bounds the whole).")


class PluginConfig(Section):
    """One plugin in the hook chain."""

    name: Id = Field(description="Unique; also the /plugins/{name}/ slug.")
    use: str = Field(description="'package.module:Class' or an entry point name in group gateway_tap.plugins.")
    llms: list[str] = Field(default_factory=lambda: ["*"], description="LLM ids it attaches to, or '*'.")
    order: int = Field(default=0, description="Lower runs first; ties keep file order.")
    timeout_ms: float = Field(default=1000.0, gt=0, description="Per hook call.")
    on_error: Literal["fail_closed", "fail_open"] = Field(
        default="fail_closed",
        description="A hook that raises or exceeds timeout_ms: fail_closed ends the request (500 plugin_error), "
                    "fail_open skips the hook as if it had not run.")
    enabled: bool = Field(default=True, description="false: the plugin is not loaded at all.")
    config: dict[str, Any] = Field(default_factory=dict, description="Validated against the plugin's schema.")
    kv: PluginKVSettings = Field(default_factory=PluginKVSettings)  # type: ignore[arg-type]
