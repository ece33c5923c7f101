"""``gateway-tap replay``: re-export a range of a collector's topics through that collector.

The range is read by the real collector runtime (batching, retries, dead letters, commits)
in bounded mode: partitions are assigned directly from per-partition start offsets up to
stop offsets fixed before the first fetch, under a separate consumer group
(``<group>-replay-<UTC timestamp>``), so the live collector's group is untouched. Sinks are
idempotent by event id, so replaying events that were already exported changes nothing.

Positions (``--from`` / ``--to``): an offset (``1234``, applied to every partition), a time
(ISO 8601, naive means UTC; or ``30m``, ``2h``, ``7d`` ago), ``earliest`` or ``latest``.
A time means the first record written at or after it; ``--to`` is exclusive and never
beyond the end offsets seen at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from aiokafka import TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from collectors.config import validate_collector_config
from collectors.registry import resolve_collector
from collectors.runtime import CollectorRuntime
from collectors.sdk import ConfigError
from collectors.sinks.elasticsearch import ElasticsearchCollector, EsConfig, refresh_interval_raised
from gateway_tap.ops.kafka_admin import KafkaInspector, KafkaUnavailable, quiet_client_logs
from gateway_tap.settings import CollectorSettings, GatewayConfig, MetricsSettings, group_id_for
from schemas import EventType, topic_for

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class ReplayError(Exception):
    """The replay cannot start (bad position, unknown type, missing topics); the message says what to change."""


@dataclass(frozen=True, slots=True)
class Position:
    """One end of a range: exactly one of ``offset``, ``timestamp_ms`` and ``edge`` is set."""

    offset: int | None = None
    timestamp_ms: int | None = None
    edge: Literal["earliest", "latest"] | None = None

    def describe(self) -> str:
        if self.offset is not None:
            return f"offset {self.offset}"
        if self.timestamp_ms is not None:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, UTC).isoformat(timespec="seconds")
        return str(self.edge)


def parse_position(text: str, now: datetime | None = None) -> Position:
    """Parse ``--from`` / ``--to``. :raises ReplayError: not an offset, time, duration or edge."""
    text = text.strip()
    if text in ("earliest", "beginning"):
        return Position(edge="earliest")
    if text in ("latest", "end"):
        return Position(edge="latest")
    if text.isdigit():
        return Position(offset=int(text))
    now = now or datetime.now(UTC)
    if m := _AGO.match(text):
        when = now - timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ReplayError(f"{text!r} is not an offset, an ISO 8601 time, a duration ago (30m, 2h, 7d), "
                              "'earliest' or 'latest'") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return Position(timestamp_ms=int(when.timestamp() * 1000))


async def _resolve(kafka: KafkaInspector, tps: list[TopicPartition], pos: Position, begin: dict[TopicPartition, int],
                   end: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    """Per partition, the offset ``pos`` designates, clamped to [beginning, end]."""
    if pos.edge is not None:
        return dict(begin if pos.edge == "earliest" else end)
    if pos.offset is not None:
        return {tp: min(max(pos.offset, begin[tp]), end[tp]) for tp in tps}
    assert pos.timestamp_ms is not None
    found = await kafka.offsets_for_time(tps, pos.timestamp_ms)
    return {tp: end[tp] if found.get(tp) is None else max(begin[tp], found[tp] or 0) for tp in tps}


async def plan_ranges(kafka: KafkaInspector, topics: Iterable[str], start: Position,
                      stop: Position | None = None) -> dict[TopicPartition, tuple[int, int]]:
    """Per partition of ``topics``: (start, stop) offsets, stop exclusive and at most today's end offset.

    :raises ReplayError: a topic does not exist.
    """
    topics = list(topics)
    parts = await kafka.partitions(topics)
    missing = [t for t in topics if t not in parts]
    if missing:
        raise ReplayError(f"topic(s) not found: {', '.join(missing)} (check kafka.topic_prefix)")
    tps = [tp for t in topics for tp in parts[t]]
    begin, end = await kafka.offsets(tps)
    first = await _resolve(kafka, tps, start, begin, end)
    last = await _resolve(kafka, tps, stop, begin, end) if stop is not None else end
    return {tp: (first[tp], max(first[tp], min(last[tp], end[tp]))) for tp in tps}


def replay_group_id(base: str, now: datetime | None = None) -> str:
    """``<base>-replay-<UTC timestamp>``: a fresh group per replay, never the live collector's."""
    return f"{base}-replay-{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}"


@dataclass
class ReplayResult:
    """What a replay did: records handled (exported or dead-lettered) out of those planned."""

    group_id: str
    planned: int
    handled: int
    completed: bool
    exit_code: int


async def replay(config: GatewayConfig, name: str, start: Position, stop: Position | None = None,
                 types: Iterable[EventType] | None = None, console: Console | None = None,
                 stop_event: asyncio.Event | None = None, refresh_interval: str | None = None) -> ReplayResult:
    """Replay collector NAME's topics (or only ``types``) from ``start`` to ``stop`` and return the counts.

    :param refresh_interval: for an ``elasticsearch`` collector, the ``index.refresh_interval`` its existing
        indices get for the duration (e.g. ``30s``, ``-1``); each index's own value is put back at the end.

    :raises ReplayError: NAME does not consume one of ``types``, or a topic is missing.
    :raises ConfigError: NAME cannot be loaded or its config is invalid.
    :raises KafkaUnavailable: the ranges could not be planned.
    """
    settings = config.collectors.get(name) or CollectorSettings.model_validate({})
    collector_cls = resolve_collector(settings.plugin or name)
    validate_collector_config(name, collector_cls, settings.config)
    if refresh_interval is not None and not issubclass(collector_cls, ElasticsearchCollector):
        raise ReplayError(f"--refresh-interval applies to an elasticsearch collector, not {name!r}")
    consumed = collector_cls.consumed_types()
    chosen = tuple(types) if types else consumed
    unknown = [t for t in chosen if t not in consumed]
    if unknown:
        raise ReplayError(f"collector {name!r} does not consume {', '.join(unknown)} "
                          f"(it consumes {', '.join(consumed)})")
    prefix = config.kafka.topic_prefix
    async with KafkaInspector(config.kafka.client_options(), f"{config.kafka.client_id}-replay") as kafka:
        ranges = await plan_ranges(kafka, [topic_for(t, prefix) for t in chosen], start, stop)
    group = replay_group_id(group_id_for(name, settings, prefix))
    planned = sum(b - a for a, b in ranges.values())
    console = console or Console(stderr=True)
    console.print(f"replaying {planned:,} record(s) of {', '.join(sorted({tp.topic for tp in ranges}))} "
                  f"from {start.describe()} to {stop.describe() if stop else 'the current end'} "
                  f"through {name!r} as group {group}")
    # No metrics server (the live worker has the port); the replay group id is the worker identity.
    replay_settings = settings.model_copy(update={"group_id": group, "group_instance_id": None,
                                                  "metrics": MetricsSettings(port=None)})
    handled = 0
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(f"replay {name}", total=planned)

        def advance(count: int) -> None:
            nonlocal handled
            handled += count
            progress.update(task, completed=min(handled, planned))

        runtime = CollectorRuntime(name, collector_cls, replay_settings, config.kafka.client_options(), prefix,
                                   config.kafka.client_id, root=config, extras={"group_instance_id": group},
                                   ranges=ranges, on_batch_done=advance)
        waiter = asyncio.create_task((stop_event or asyncio.Event()).wait())
        waiter.add_done_callback(lambda t: None if t.cancelled() else runtime.request_stop())
        try:
            async with contextlib.AsyncExitStack() as stack:
                if refresh_interval is not None:
                    es_settings = EsConfig.model_validate(validate_collector_config(name, collector_cls,
                                                                                    settings.config))
                    await stack.enter_async_context(refresh_interval_raised(es_settings, refresh_interval))
                    console.print(f"refresh_interval of {es_settings.index_prefix}-* set to {refresh_interval} "
                                  "until the replay ends")
                code = await runtime.run()
        finally:
            waiter.cancel()
        if runtime.ranges_done:
            progress.update(task, completed=planned)  # offsets without records (gaps) count as done
    # Stopped early (Ctrl-C): exit 1 even after a clean stop, the range is not complete.
    return ReplayResult(group, planned, handled, runtime.ranges_done, code if runtime.ranges_done else code or 1)


def run_replay(config: GatewayConfig, name: str, start: str, stop: str | None, types: list[EventType],
               refresh_interval: str | None = None) -> int:
    """``gateway-tap replay``: run on a fresh loop, Ctrl-C stops cleanly (the batch in hand is committed)."""
    quiet_client_logs()
    console = Console(stderr=True)

    async def main() -> ReplayResult:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        return await replay(config, name, parse_position(start), parse_position(stop) if stop else None, types,
                            console, stopping, refresh_interval)

    try:
        result = asyncio.run(main())
    except (ReplayError, ConfigError, KafkaUnavailable) as exc:
        console.print(f"[bold red]replay failed:[/] {exc}")
        return 2
    verdict = "done" if result.completed else "[yellow]stopped before the end[/]"
    console.print(f"{verdict}: {result.handled:,} record(s) replayed through {name!r} "
                  f"(of {result.planned:,} planned) as group {result.group_id}")
    return result.exit_code
