"""``gateway-tap lake compact`` and ``gateway-tap lake ddl``: operator commands over a ``lake`` collector's output.

Both read the collector's section of the config file (``collectors.<NAME>.config``), so they always describe the
destination and layout the collector writes.
"""

from __future__ import annotations

import logging
from datetime import date

from collectors.config import parse_collector_config
from collectors.registry import resolve_collector
from collectors.sdk import ConfigError
from collectors.sinks.lake.collector import LakeCollector
from collectors.sinks.lake.compact import compact
from collectors.sinks.lake.config import LakeConfig
from collectors.sinks.lake.ddl import ddl
from collectors.sinks.lake.store import StoreError, open_store
from gateway_tap.settings import GatewayConfig


def lake_config(config: GatewayConfig, name: str) -> LakeConfig:
    """The ``lake`` collector NAME's config from the file.

    :raises ConfigError: NAME is not configured, is not a lake collector, or its config is invalid.
    """
    settings = config.collectors.get(name)
    if settings is None:
        raise ConfigError(f"collectors.{name}: no such collector in the config file")
    if not issubclass(resolve_collector(settings.plugin or name), LakeCollector):
        raise ConfigError(f"collectors.{name}: not a lake collector")
    return parse_collector_config(name, LakeConfig, settings.config)


def run_ddl(config: GatewayConfig, name: str, engine: str, table_prefix: str, since: str) -> str:
    """The external-table definitions for ``engine``."""
    return ddl(lake_config(config, name), engine, table_prefix=table_prefix, since=since)


def run_compact(config: GatewayConfig, name: str, before: date) -> int:
    """Compact the lake of collector NAME (days before ``before``); prints a summary, returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lake = lake_config(config, name)
    store = open_store(lake, f"collectors.{name}.config")
    try:
        store.check()
        result = compact(store, lake, before)
    except StoreError as exc:
        print(f"error: {exc}")
        return 1
    print(f"merged {result.merged_objects} object(s) into {result.written_objects} ({result.rows} rows); "
          f"finished {result.finished_interrupted} interrupted merge(s)")
    return 0
