"""The one YAML configuration file (``gateway-tap.yaml``), declared and validated in one place.

Every section is a pydantic model on :class:`~gateway_tap.settings.base.Section`
(``extra="forbid"``), so a typo is an error that names its key path instead of a
silently ignored setting. Each field's ``description`` is its documentation and a
``RESTART`` mark says it is read once at start (``docs/configuration.md`` is generated
from these declarations: ``python -m gateway_tap.config_docs``). :func:`load_config`
is the only way in.

This package is the bottom layer above :mod:`schemas`: it imports nothing else of
gateway-tap, so the tap, the budgets, the publisher and the collectors all build on it.

One module per section: :mod:`.kafka`, :mod:`.tap` (with :mod:`.publisher`), :mod:`.llms`,
:mod:`.apps`, :mod:`.plugins`, :mod:`.budgets` (``budgets``, ``budget_store``,
``budget_enforcement``), :mod:`.ratelimits` (``rate_limits``, ``rate_limiting``), :mod:`.redis`,
:mod:`.collectors`; :mod:`.root` holds the whole file.
"""

from gateway_tap.settings.admin import AdminListenSettings, AdminSettings, AdminTokenSettings
from gateway_tap.settings.apps import AppConfig, default_key_id
from gateway_tap.settings.base import RESTART, Section
from gateway_tap.settings.budgets import (
    BudgetEnforcementSettings,
    BudgetSettings,
    BudgetStoreSettings,
    Period,
)
from gateway_tap.settings.collectors import (
    BatchSettings,
    CollectorDefaults,
    CollectorSettings,
    MetricsSettings,
    RetrySettings,
    group_id_for,
)
from gateway_tap.settings.kafka import KafkaSettings
from gateway_tap.settings.llms import LLMConfig, LLMLimits, LLMTimeouts, ModelPrice
from gateway_tap.settings.loop_monitor import LoopMonitorSettings
from gateway_tap.settings.plugins import PluginConfig, PluginKVSettings
from gateway_tap.settings.publisher import PublisherSettings
from gateway_tap.settings.ratelimits import RateLimitingSettings, RateLimitKind, RateLimitSettings
from gateway_tap.settings.redis import RedisSettings
from gateway_tap.settings.root import ConfigFileError, GatewayConfig, load_config, parse_config
from gateway_tap.settings.tap import LimitSettings, ListenSettings, ReloadSettings, TapMetricsSettings, TapSettings

__all__ = [
    "RESTART",
    "AdminListenSettings",
    "AdminSettings",
    "AdminTokenSettings",
    "AppConfig",
    "BatchSettings",
    "BudgetEnforcementSettings",
    "BudgetSettings",
    "BudgetStoreSettings",
    "CollectorDefaults",
    "CollectorSettings",
    "ConfigFileError",
    "GatewayConfig",
    "KafkaSettings",
    "LLMConfig",
    "LLMLimits",
    "LLMTimeouts",
    "LimitSettings",
    "ListenSettings",
    "LoopMonitorSettings",
    "MetricsSettings",
    "ModelPrice",
    "Period",
    "PluginConfig",
    "PluginKVSettings",
    "PublisherSettings",
    "RateLimitKind",
    "RateLimitSettings",
    "RateLimitingSettings",
    "RedisSettings",
    "ReloadSettings",
    "RetrySettings",
    "Section",
    "TapMetricsSettings",
    "TapSettings",
    "default_key_id",
    "group_id_for",
    "load_config",
    "parse_config",
]
