"""The ``collectors`` section of the config file: one entry per collector NAME.

```yaml
collectors:
  file:
    group_instance_id: file-1        # static membership: a restarted worker takes its place at once
    batch: {max_events: 5000, max_wait_ms: 200}
    metrics: {port: 9465}
    config: {directory: /var/lib/gateway-tap/events}
```

``config`` is the collector's own settings; it is validated against the collector's
``config_schema`` (JSON Schema) when ``gateway-tap collect`` starts, with errors naming
the key path (``collectors.file.config.directory: ...``).
"""

from __future__ import annotations

from typing import Any

import jsonschema
from pydantic import BaseModel, ConfigDict, Field

from collectors.sdk import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchSettings(_Section):
    """How much the runtime hands a collector at once; a batch closes at whichever limit is hit first."""

    max_events: int = Field(5000, gt=0, description="Most events in one batch.")
    max_bytes: int = Field(16 * 1024 * 1024, gt=0, description="Most message-value bytes in one batch.")
    max_wait_ms: int = Field(200, ge=0, description="Longest wait for a batch to fill once it has started.")


class RetrySettings(_Section):
    """Backoff for retriable failures (RetryLater, unexpected errors): exponential with full jitter."""

    initial_backoff_ms: int = Field(200, gt=0)
    max_backoff_ms: int = Field(30_000, gt=0)


class MetricsSettings(_Section):
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP; ``port: null`` turns the server off."""

    host: str = "127.0.0.1"
    port: int | None = Field(9465, ge=0, le=65535)


class CollectorSettings(_Section):
    """Settings of one collector NAME (the key under ``collectors``)."""

    plugin: str | None = Field(None, description="What to run when it is not NAME itself: a built-in, an entry "
                                                 "point of group gateway_tap.collectors, or module:Class.")
    group_id: str | None = Field(None, description="Consumer group (default: <kafka.topic_prefix>.collector.<NAME>).")
    group_instance_id: str | None = Field(None, description="Static membership id; a restarted worker with the "
                                                            "same id takes over its partitions without a rebalance.")
    session_timeout_ms: int = Field(30_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    fetch_max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    max_partition_fetch_bytes: int = Field(8 * 1024 * 1024, gt=0)
    auto_offset_reset: str = Field("earliest", pattern="^(earliest|latest)$",
                                   description="Where a new group starts.")
    batch: BatchSettings = Field(default_factory=BatchSettings)  # type: ignore[arg-type]
    retry: RetrySettings = Field(default_factory=RetrySettings)  # type: ignore[arg-type]
    shutdown_grace_s: float = Field(30.0, gt=0, description="On SIGTERM/SIGINT: time to finish, flush and commit.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)  # type: ignore[arg-type]
    config: dict[str, Any] = Field(default_factory=dict, description="The collector's own config (its schema).")


def group_id_for(name: str, settings: CollectorSettings, topic_prefix: str = "gateway") -> str:
    """The consumer group of collector NAME: ``group_id`` if set, else ``<topic_prefix>.collector.<NAME>``.

    The topic prefix is part of the default so that two pipelines sharing a Kafka
    cluster (``gateway``, ``staging``, ...) never share a consumer group.
    """
    return settings.group_id or f"{topic_prefix}.collector.{name}"


def validate_collector_config(name: str, schema: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` against ``schema`` and fill in top-level ``default`` values.

    :raises ConfigError: one line per problem, each naming ``collectors.<name>.config.<path>``.
    """
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path)):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        problems.append(f"collectors.{name}.config{path}: {err.message}")
    if problems:
        raise ConfigError("\n".join(problems))
    filled = dict(config)
    for key, prop in schema.get("properties", {}).items():
        if key not in filled and isinstance(prop, dict) and "default" in prop:
            filled[key] = prop["default"]
    return filled
