"""The whole file, :class:`GatewayConfig`, and the one way in: :func:`load_config` / :func:`parse_config`."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError

from gateway_tap.settings.apps import AppConfig
from gateway_tap.settings.base import RESTART, Section, format_validation_error
from gateway_tap.settings.budgets import (
    BudgetEnforcementSettings,
    BudgetSettings,
    BudgetStoreSettings,
    check_budget_references,
)
from gateway_tap.settings.collectors import CollectorDefaults, CollectorSettings
from gateway_tap.settings.kafka import KafkaSettings
from gateway_tap.settings.llms import LLMConfig, unknown_llm_refs
from gateway_tap.settings.loop_monitor import LoopMonitorSettings
from gateway_tap.settings.plugins import PluginConfig
from gateway_tap.settings.ratelimits import RateLimitingSettings, RateLimitSettings, check_rate_limit_references
from gateway_tap.settings.redis import RedisSettings
from gateway_tap.settings.tap import TapSettings


class GatewayConfig(Section):
    """The whole file."""

    gateway_id: Annotated[str, RESTART] = Field(default_factory=socket.gethostname,
                                                description="Identifies this tap in every event (default: host name).")
    kafka: Annotated[KafkaSettings, RESTART] = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    tap: TapSettings = Field(default_factory=TapSettings)  # type: ignore[arg-type]
    llms: list[LLMConfig] = Field(default_factory=list, description="Upstreams, by id.")
    apps: list[AppConfig] = Field(default_factory=list, description="Client applications, by id.")
    plugins: list[PluginConfig] = Field(default_factory=list, description="The hook chain, by name.")
    budgets: list[BudgetSettings] = Field(default_factory=list,
                                          description="Spend/token budgets per app (x LLM), and per key of an app.")
    budget_store: Annotated[BudgetStoreSettings, RESTART] = Field(
        default_factory=BudgetStoreSettings)  # type: ignore[arg-type]
    budget_enforcement: BudgetEnforcementSettings = Field(
        default_factory=BudgetEnforcementSettings)  # type: ignore[arg-type]
    rate_limits: list[RateLimitSettings] = Field(
        default_factory=list, description="Requests, tokens and concurrent requests per app, key, app x LLM / model.")
    rate_limiting: RateLimitingSettings = Field(default_factory=RateLimitingSettings)  # type: ignore[arg-type]
    redis: Annotated[RedisSettings, RESTART] = Field(default_factory=RedisSettings)  # type: ignore[arg-type]
    collectors: dict[str, CollectorSettings] = Field(
        default_factory=dict, description="Collector workers by NAME (as given to `gateway-tap collect NAME`).")
    loop_monitor: Annotated[LoopMonitorSettings, RESTART] = Field(
        default_factory=LoopMonitorSettings)  # type: ignore[arg-type]

    def collector_defaults(self) -> CollectorDefaults:
        """What a collector may fall back on from this file (handed over as ``CollectorServices.defaults``)."""
        return CollectorDefaults(budgets=tuple(self.budgets), budget_store=self.budget_store)


def _check_tap_references(config: GatewayConfig) -> list[str]:
    """Cross-section checks pydantic cannot express: unique ids and references to known LLMs."""
    problems: list[str] = []
    llm_ids = {llm.id for llm in config.llms}
    for section, items in (("llms", config.llms), ("apps", config.apps), ("plugins", config.plugins)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            key = getattr(item, "name" if section == "plugins" else "id")
            if key in seen:
                problems.append(f"{section}[{i}]: duplicate {'name' if section == 'plugins' else 'id'} {key!r}")
            seen.add(key)
    for section, refs in (("apps", [a.allowed_llms for a in config.apps]),
                          ("plugins", [p.llms for p in config.plugins])):
        field = "allowed_llms" if section == "apps" else "llms"
        for i, ids in enumerate(refs):
            for j, llm_id in unknown_llm_refs(ids, llm_ids):
                problems.append(f"{section}[{i}].{field}[{j}]: unknown LLM {llm_id!r}")
    return problems


class ConfigFileError(ValueError):
    """The configuration file is unreadable or invalid. ``str()`` lists each problem by key path."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid configuration {self.path}:\n" + "\n".join(f"  - {p}" for p in problems))


def parse_config(data: Any, source: str | Path = "<config>") -> GatewayConfig:
    """Validate an already-parsed YAML document.

    :raises ConfigFileError: naming every offending key path.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(source, [f"(root): expected a mapping, got {type(data).__name__}"])
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(source, format_validation_error(exc)) from None
    app_ids, llm_ids = {a.id for a in config.apps}, {llm.id for llm in config.llms}
    key_ids = {a.id: a.all_key_ids() for a in config.apps}
    problems = (_check_tap_references(config) + check_budget_references(config.budgets, app_ids, llm_ids, key_ids)
                + check_rate_limit_references(config.rate_limits, app_ids, llm_ids))
    if problems:
        raise ConfigFileError(source, problems)
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the YAML file at ``path``.

    :raises ConfigFileError: the file is missing, not YAML, or fails validation;
        the message names every offending key path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(path, [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigFileError(path, [f"(yaml): {where}{getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, path)
