"""``gateway-tap status``: collector lag, dead letters, the taps' spools, the admin state version each tap
worker runs, and budget use (file and API budgets), in one report.

:func:`gather_status` collects a :class:`StatusReport` (each part independently: an
unreachable part is reported as such, never raised); :func:`render_status` prints it
as rich tables and :func:`status_json` as one JSON document for scripts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gateway_tap.ops.kafka_admin import KafkaInspector, KafkaUnavailable, quiet_client_logs
from gateway_tap.ops.targets import collector_targets
from gateway_tap.settings import BudgetSettings, GatewayConfig
from schemas import EVENT_TYPES, dlq_topic, topic_for

TAP_METRICS = {
    "gateway_tap_publisher_spool_pending_events": "spool_pending_events",
    "gateway_tap_publisher_spool_bytes": "spool_bytes",
    "gateway_tap_publisher_queue_depth_events": "queue_depth_events",
    "gateway_tap_publisher_kafka_connected": "kafka_connected",
    "gateway_tap_ratelimit_limited_total": "rate_limited",
    "gateway_tap_redis_up": "redis_up",
}
"""Tap metric name -> :class:`TapStatus` field."""


@dataclass
class PartitionLag:
    partition: int
    committed: int | None
    end: int
    lag: int


@dataclass
class TopicLag:
    """A group's position on one topic, summed over partitions (``exists`` False: topic not created yet)."""

    topic: str
    exists: bool
    committed: int = 0
    end: int = 0
    lag: int = 0
    partitions: list[PartitionLag] = field(default_factory=list)


@dataclass
class GroupStatus:
    collector: str
    group_id: str
    topics: list[TopicLag]
    note: str | None = None


@dataclass
class DlqStatus:
    """A dead-letter topic; ``records`` is end - beginning offsets, exact for DLQs (plain producer, no
    compaction, so offsets have no gaps)."""

    topic: str
    exists: bool
    partitions: int = 0
    records: int = 0


@dataclass
class TapStatus:
    url: str
    error: str | None = None
    spool_pending_events: float | None = None
    spool_bytes: float | None = None
    queue_depth_events: float | None = None
    kafka_connected: float | None = None
    rate_limited: float | None = None  # requests refused by rate limits since the tap started
    redis_up: float | None = None  # summed over workers: how many reach Redis (None: no Redis in use)


@dataclass
class BudgetLine:
    app_id: str
    llm_id: str | None
    period: str
    mode: str
    period_start: str
    limit_usd: float | None
    limit_tokens: int | None
    spent_usd: float
    spent_tokens: int
    used_pct: float
    key_id: str | None = None
    """A key's own budget: the key's id."""


@dataclass
class RateLimitLine:
    """One ``rate_limits`` entry in force (the file's, or the admin API's)."""

    scope: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None
    source: str = "yaml"


@dataclass
class AdminTapLine:
    """The admin state version one tap worker runs and the entries it left out (from ``admin_taps``)."""

    gateway_id: str
    worker: int
    pid: int
    version: int
    seen_s_ago: float
    not_applied: tuple[str, ...] = ()
    """``entry: why`` of each entry of the state this worker could not apply."""


@dataclass
class StatusReport:
    bootstrap: str
    kafka_error: str | None = None
    groups: list[GroupStatus] = field(default_factory=list)
    dlq: list[DlqStatus] = field(default_factory=list)
    taps: list[TapStatus] = field(default_factory=list)
    budgets: list[BudgetLine] = field(default_factory=list)
    budget_error: str | None = None
    rate_limiting: str = "off"  # off, local or shared
    rate_limits: list[RateLimitLine] = field(default_factory=list)
    admin_version: int | None = None
    admin_taps: list[AdminTapLine] = field(default_factory=list)
    admin_error: str | None = None

    @property
    def exit_code(self) -> int:
        """2 when Kafka is unreachable (nothing about the pipeline is known), else 0."""
        return 2 if self.kafka_error else 0


def default_tap_urls(config: GatewayConfig) -> list[str]:
    """The configured tap's metrics URL (``tap.metrics``; a wildcard address is reached on loopback)."""
    metrics = config.tap.metrics
    if metrics.port is None:
        return []
    host = "127.0.0.1" if metrics.host in ("0.0.0.0", "", "::") else metrics.host
    return [f"http://{host}:{metrics.port}/metrics"]


async def gather_status(config: GatewayConfig, tap_urls: list[str] | None = None,
                        now: datetime | None = None) -> StatusReport:
    """Every part of the report, gathered concurrently; failures are recorded in the report."""
    report = StatusReport(bootstrap=config.kafka.bootstrap_servers)
    if config.rate_limiting.enabled:
        report.rate_limiting = config.rate_limiting.mode
        report.rate_limits = [RateLimitLine(r.scope, r.requests_per_minute, r.tokens_per_minute, r.max_concurrent)
                              for r in config.rate_limits]
    urls = [u if u.rstrip("/").endswith("/metrics") else u.rstrip("/") + "/metrics"
            for u in (tap_urls or default_tap_urls(config))]
    _, _, report.taps = await asyncio.gather(_kafka_part(config, report),
                                             _admin_and_budget_parts(config, report, now or datetime.now(UTC)),
                                             asyncio.gather(*(tap_status(u) for u in urls)))
    return report


async def _admin_and_budget_parts(config: GatewayConfig, report: StatusReport, now: datetime) -> None:
    await _budget_part(config, report, now, await _admin_part(config, report, now))


async def _admin_part(config: GatewayConfig, report: StatusReport, now: datetime) -> tuple[BudgetSettings, ...]:
    """The admin state's version and the version each tap worker runs; returns the API-managed budgets."""
    from gateway_tap.admin.db import connect
    from gateway_tap.admin.store import AdminStore
    from gateway_tap.budgets.store import BudgetStoreError

    if not config.tap.admin.enabled:
        return ()
    settings = config.budget_store
    if settings.backend == "sqlite" and not await asyncio.to_thread(Path(settings.sqlite_path).exists):
        report.admin_error = f"no admin state yet at {settings.sqlite_path}"
        return ()
    try:
        store = AdminStore(await connect(settings, migrate=False))
    except (BudgetStoreError, ValueError, OSError) as exc:
        report.admin_error = f"admin state unavailable: {exc}"
        return ()
    try:
        state = await store.state()
        report.admin_version = state.version
        report.admin_taps = [AdminTapLine(t.gateway_id, t.worker, t.pid, t.version,
                                          round(now.timestamp() - t.seen_s, 1),
                                          tuple(f"{r.entry}: {r.error}" for r in t.rejected))
                             for t in await store.taps()]
        return state.budgets
    except BudgetStoreError as exc:
        report.admin_error = f"admin state unavailable: {exc}"
        return ()
    finally:
        await store.close()


async def _kafka_part(config: GatewayConfig, report: StatusReport) -> None:
    try:
        async with KafkaInspector(config.kafka.client_options(), f"{config.kafka.client_id}-status") as kafka:
            report.groups = await _group_lags(kafka, config)
            report.dlq = await _dlq_sizes(kafka, config)
    except KafkaUnavailable as exc:
        report.kafka_error = str(exc)


async def _group_lags(kafka: KafkaInspector, config: GatewayConfig) -> list[GroupStatus]:
    targets = collector_targets(config)
    parts = await kafka.partitions({t for target in targets for t in target.topics})
    all_tps = [tp for tps in parts.values() for tp in tps]
    begin, end = await kafka.offsets(all_tps)
    groups = []
    for target in targets:
        committed = await kafka.committed(target.group_id)
        topics = []
        for topic in target.topics:
            if topic not in parts:
                topics.append(TopicLag(topic, exists=False))
                continue
            lag = TopicLag(topic, exists=True)
            for tp in parts[topic]:
                done = committed.get(tp)
                # Without a commit the group starts at the beginning (auto_offset_reset: earliest).
                behind = end[tp] - max(done if done is not None else begin[tp], begin[tp])
                lag.partitions.append(PartitionLag(tp.partition, done, end[tp], max(0, behind)))
                lag.committed += done or 0
                lag.end += end[tp]
                lag.lag += max(0, behind)
            topics.append(lag)
        groups.append(GroupStatus(target.name, target.group_id, topics, target.error))
    return groups


async def _dlq_sizes(kafka: KafkaInspector, config: GatewayConfig) -> list[DlqStatus]:
    topics = await dlq_topics(kafka, config.kafka.topic_prefix)
    parts = await kafka.partitions(topics)
    begin, end = await kafka.offsets([tp for tps in parts.values() for tp in tps])
    return [DlqStatus(t, t in parts, len(parts.get(t, [])), sum(end[tp] - begin[tp] for tp in parts.get(t, [])))
            for t in topics]


async def dlq_topics(kafka: KafkaInspector, prefix: str) -> list[str]:
    """The DLQs of the three event topics (existing or not) plus any other existing ``<prefix>.*.dlq``."""
    standard = [dlq_topic(topic_for(t, prefix)) for t in EVENT_TYPES]
    others = sorted(t for t in await kafka.topics()
                    if t.startswith(prefix + ".") and t.endswith(".dlq") and t not in standard)
    return standard + others


async def tap_status(url: str, timeout_s: float = 3.0) -> TapStatus:
    """The publisher gauges from one tap's ``/metrics`` (summed over label sets)."""
    status = TapStatus(url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    status.error = f"HTTP {resp.status}"
                    return status
                text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        status.error = f"unreachable ({getattr(exc, 'strerror', None) or type(exc).__name__})"
        return status
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                attr = TAP_METRICS.get(sample.name)
                if attr is not None:
                    setattr(status, attr, (getattr(status, attr) or 0.0) + sample.value)
    except ValueError as exc:
        status.error = f"unparsable metrics: {exc}"
    if status.error is None and status.spool_pending_events is None:
        status.error = "no gateway_tap_publisher_* metrics (not a tap?)"
    return status


async def _budget_part(config: GatewayConfig, report: StatusReport, now: datetime,
                       api_budgets: Sequence[BudgetSettings] = ()) -> None:
    from gateway_tap.budgets.periods import micros_to_usd, period_start
    from gateway_tap.budgets.store import BudgetStoreError, open_store

    budgets = [*config.budgets, *api_budgets]
    if not budgets:
        return
    store_settings = config.budget_store
    if store_settings.backend == "sqlite" and not await asyncio.to_thread(Path(store_settings.sqlite_path).exists):
        report.budget_error = f"no budget store yet at {store_settings.sqlite_path} (nothing recorded)"
        return
    try:
        store = await open_store(store_settings, migrate=False)
    except (BudgetStoreError, ValueError, OSError) as exc:
        report.budget_error = f"budget store unavailable: {exc}"
        return
    try:
        for b in budgets:
            start = period_start(b.period, now)
            spend = await store.spend(b.app_id, b.llm_id, b.period, start, b.key_id)
            spent_usd = micros_to_usd(spend.cost_micros)
            used = [spent_usd / b.limit_usd if b.limit_usd else None,
                    spend.total_tokens / b.limit_tokens if b.limit_tokens else None]
            pct = max((u for u in used if u is not None), default=0.0) * 100
            report.budgets.append(BudgetLine(b.app_id, b.llm_id, b.period, b.mode, start.isoformat(), b.limit_usd,
                                             b.limit_tokens, spent_usd, spend.total_tokens, round(pct, 2), b.key_id))
    except BudgetStoreError as exc:
        report.budget_error = f"budget store unavailable: {exc}"
        report.budgets = []
    finally:
        await store.close()


def status_json(report: StatusReport) -> str:
    """The report as one JSON document (per-partition detail included)."""
    return orjson.dumps({**asdict(report), "exit_code": report.exit_code}, option=orjson.OPT_INDENT_2).decode()


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render_status(report: StatusReport, console: Console) -> None:
    """Rich tables: collector lag, dead letters, taps, budgets."""
    if report.kafka_error:
        console.print(f"[bold red]{report.kafka_error}[/]: collector lag and dead letters unknown")
    else:
        lag = Table(title="Collector lag", title_justify="left")
        lag.add_column("collector / group", overflow="fold")
        lag.add_column("topic", overflow="fold")
        for col in ("committed", "end", "lag"):
            lag.add_column(col, justify="right")
        for g in report.groups:
            label = [f"[bold]{g.collector}[/]", f"[dim]{g.group_id}[/]"]
            if g.note:
                label.append(f"[yellow]not loadable: {g.note}[/]")
            # One label line per topic row; whatever is left over goes into the last row.
            cells = [*label[:len(g.topics) - 1], "\n".join(label[len(g.topics) - 1:])]
            for i, t in enumerate(g.topics):
                numbers = (_num(t.committed), _num(t.end), f"[{'red' if t.lag else 'green'}]{t.lag:,}[/]") \
                    if t.exists else ("-", "-", "[dim]no topic[/]")
                lag.add_row(cells[i] if i < len(cells) else "", t.topic, *numbers,
                            end_section=i == len(g.topics) - 1)
        console.print(lag)
        dlq = Table(title="Dead letters", title_justify="left")
        for col in ("topic", "partitions", "records"):
            dlq.add_column(col, justify="left" if col == "topic" else "right")
        for d in report.dlq:
            records = f"[{'red' if d.records else 'green'}]{d.records:,}[/]" if d.exists else "[dim]not created[/]"
            dlq.add_row(d.topic, str(d.partitions) if d.exists else "-", records)
        console.print(dlq)
    taps = Table(title="Taps", title_justify="left")
    for col in ("metrics", "kafka", "queue", "spool events", "spool bytes", "rate-limited", "redis"):
        taps.add_column(col, justify="left" if col == "metrics" else "right")
    for tap in report.taps:
        if tap.error:
            taps.add_row(tap.url, f"[red]{tap.error}[/]", "", "", "", "", "")
        else:
            connected = "[green]connected[/]" if tap.kafka_connected else "[red]disconnected[/]"
            redis = "-" if tap.redis_up is None else "[green]up[/]" if tap.redis_up else "[red]down[/]"
            taps.add_row(tap.url, connected, _num(tap.queue_depth_events), _num(tap.spool_pending_events),
                         _num(tap.spool_bytes), _num(tap.rate_limited or 0), redis)
    console.print(taps)
    if report.rate_limits:
        limits = Table(title=f"Rate limits ({report.rate_limiting})", title_justify="left")
        for col in ("scope", "requests/min", "tokens/min", "in flight", "source"):
            limits.add_column(col, justify="left" if col in ("scope", "source") else "right")
        for r in report.rate_limits:
            limits.add_row(r.scope, _num(r.requests_per_minute), _num(r.tokens_per_minute), _num(r.max_concurrent),
                           r.source)
        console.print(limits)
    else:
        console.print(f"[dim]Rate limits: none configured (rate limiting {report.rate_limiting})[/]")
    if report.admin_error:
        console.print(f"[yellow]Admin state: {report.admin_error}[/]")
    elif report.admin_version is not None:
        admin = Table(title=f"Admin state (version {report.admin_version})", title_justify="left")
        for col in ("gateway", "worker", "pid", "runs version", "reported", "not applied"):
            admin.add_column(col, justify="left" if col in ("gateway", "not applied") else "right")
        for line in report.admin_taps:
            colour = "green" if line.version == report.admin_version else "yellow"
            admin.add_row(line.gateway_id, str(line.worker), str(line.pid), f"[{colour}]{line.version}[/]",
                          f"{line.seen_s_ago:,.0f} s ago",
                          f"[yellow]{escape(chr(10).join(line.not_applied))}[/]" if line.not_applied else "-")
        console.print(admin)
    if report.budget_error:
        console.print(f"[yellow]Budgets: {report.budget_error}[/]")
    elif report.budgets:
        budgets = Table(title="Budgets (current period)", title_justify="left")
        for col in ("app", "key", "llm", "period", "mode", "spent / limit USD", "tokens / limit", "used"):
            budgets.add_column(col, justify="right" if col in ("used",) else "left")
        for b in report.budgets:
            colour = "red" if b.used_pct >= 100 else "yellow" if b.used_pct >= 80 else "green"
            usd = f"{b.spent_usd:,.4f} / {b.limit_usd:,.2f}" if b.limit_usd is not None else f"{b.spent_usd:,.4f}"
            tokens = f"{b.spent_tokens:,} / {b.limit_tokens:,}" if b.limit_tokens is not None else f"{b.spent_tokens:,}"
            budgets.add_row(b.app_id, b.key_id or "*", b.llm_id or "*", f"{b.period} from {b.period_start}", b.mode,
                            usd, tokens, f"[{colour}]{b.used_pct:.1f}%[/]")
        console.print(budgets)
    else:
        console.print("[dim]Budgets: none configured[/]")


def run_status(config: GatewayConfig, tap_urls: list[str], as_json: bool, console: Console | None = None) -> int:
    """``gateway-tap status``: gather, print (tables or JSON), return the exit code."""
    quiet_client_logs()
    report = asyncio.run(gather_status(config, tap_urls))
    console = console or Console()
    if as_json:
        console.print_json(status_json(report)) if console.is_terminal else print(status_json(report))
    else:
        render_status(report, console)
    return report.exit_code
