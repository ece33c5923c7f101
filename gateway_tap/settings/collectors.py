"""The ``collectors`` section of the config file: one entry per collector NAME.

```yaml
collectors:
  file:
    group_instance_id: file-1        # static membership: a restarted worker takes its place at once
    batch: {max_events: 5000, max_wait_ms: 200}
    metrics: {port: 9465}
    config: {directory: /var/lib/gateway-tap/events}
```

``config`` is the collector's own settings; :func:`collectors.config.validate_collector_config`
checks it against the collector's declaration when ``gateway-tap collect`` starts, with errors
naming the key path (``collectors.file.config.directory: ...``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from gateway_tap.settings.base import RESTART, Section
from gateway_tap.settings.budgets import BudgetSettings, BudgetStoreSettings


class BatchSettings(Section):
    """How much the runtime hands a collector at once; a batch closes at whichever limit is hit first."""

    max_events: int = Field(default=5000, gt=0, description="Most events in one batch.")
    max_bytes: int = Field(default=16 * 1024 * 1024, gt=0, description="Most message-value bytes in one batch.")
    max_wait_ms: int = Field(default=200, ge=0, description="Longest wait for a batch to fill once it has started.")


class RetrySettings(Section):
    """Backoff for retriable failures (RetryLater, unexpected errors): exponential with full jitter."""

    initial_backoff_ms: int = Field(default=200, gt=0, description="Upper bound of the first delay.")
    max_backoff_ms: int = Field(default=30_000, gt=0, description="Upper bound of any delay.")


class MetricsSettings(Section):
    """Prometheus ``/metrics`` and ``/healthz`` over HTTP; ``port: null`` turns the server off."""

    host: str = Field(default="127.0.0.1", description="Interface the metrics server binds.")
    port: int | None = Field(default=9465, ge=0, le=65535, description="null: no metrics server.")


class CollectorSettings(Section):
    """Settings of one collector NAME (the key under ``collectors``)."""

    plugin: Annotated[str | None, RESTART] = Field(
        default=None, description="What to run when it is not NAME itself: a built-in, an entry point of group "
                                  "gateway_tap.collectors, or module:Class.")
    group_id: Annotated[str | None, RESTART] = Field(
        default=None, description="Consumer group (default: <kafka.topic_prefix>.collector.<NAME>).")
    group_instance_id: Annotated[str | None, RESTART] = Field(
        default=None, description="Static membership id; a restarted worker with the same id takes over its "
                                  "partitions without a rebalance.")
    session_timeout_ms: Annotated[int, RESTART] = Field(
        default=30_000, gt=0, description="Consumer group session timeout.")
    max_poll_interval_ms: Annotated[int, RESTART] = Field(
        default=300_000, gt=0, description="Longest time between polls before the member is considered failed.")
    fetch_max_bytes: Annotated[int, RESTART] = Field(
        default=50 * 1024 * 1024, gt=0, description="Most bytes one fetch returns.")
    max_partition_fetch_bytes: Annotated[int, RESTART] = Field(
        default=8 * 1024 * 1024, gt=0, description="Most bytes one fetch returns per partition.")
    auto_offset_reset: Annotated[str, RESTART] = Field(
        default="earliest", pattern="^(earliest|latest)$", description="Where a new group starts.")
    batch: BatchSettings = Field(default_factory=BatchSettings)  # type: ignore[arg-type]
    max_in_flight_batches: int = Field(
        default=4, ge=1, description="Batches fetched and not yet committed: the next ones are fetched and decoded "
                                     "while earlier ones are delivered. Past it the partitions are paused.")
    max_in_flight_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="Message bytes held by those batches; past it the partitions "
                                                    "are paused (not buffered) until batches are committed.")
    retry: RetrySettings = Field(default_factory=RetrySettings)  # type: ignore[arg-type]
    shutdown_grace_s: float = Field(default=30.0, gt=0,
                                    description="On SIGTERM/SIGINT: time to finish, flush and commit.")
    metrics: Annotated[MetricsSettings, RESTART] = Field(default_factory=MetricsSettings)  # type: ignore[arg-type]
    config: dict[str, Any] = Field(default_factory=dict,
                                   description="The collector's own config (see its declaration; the built-in "
                                               "ones are listed below).")


def group_id_for(name: str, settings: CollectorSettings, topic_prefix: str = "gateway") -> str:
    """The consumer group of collector NAME: ``group_id`` if set, else ``<topic_prefix>.collector.<NAME>``.

    The topic prefix is part of the default so that two pipelines sharing a Kafka
    cluster (``gateway``, ``staging``, ...) never share a consumer group.
    """
    return settings.group_id or f"{topic_prefix}.collector.{name}"


class CollectorDefaults(Section):
    """The root sections a collector may fall back on (``CollectorServices.defaults``).

    The runtime hands these over instead of the whole file: the ``budget`` collector
    checks the root ``budgets`` against the root ``budget_store`` unless its own
    ``config`` names others. A reload that changes them re-initialises the collector.
    """

    budgets: tuple[BudgetSettings, ...] = ()
    budget_store: BudgetStoreSettings = Field(default_factory=BudgetStoreSettings)  # type: ignore[arg-type]
