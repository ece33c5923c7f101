"""The live view of ``gateway-tap up``: what runs, whether it is healthy, and what flows through it.

:class:`Monitor` samples the stack once a second on a thread of its own (process
alive + health endpoint per component, the tap's and the collectors' ``/metrics``,
budget use from the store) into a :class:`Snapshot`; :func:`show` renders it as a
rich Live panel on a terminal, or as one summary line every 10 s otherwise.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gateway_tap.dev.stack import LocalStack

if TYPE_CHECKING:
    from gateway_tap.budgets.store import BudgetStore
    from gateway_tap.dev.demo_traffic import DemoTraffic
    from gateway_tap.settings import GatewayConfig

PLAIN_INTERVAL_S = 10.0


@dataclass
class Health:
    name: str
    pid: int | None
    alive: bool
    healthy: bool
    endpoint: str


@dataclass
class CollectorStats:
    handled: float = 0.0
    rate: float = 0.0
    lag: float = 0.0
    dead_lettered: float = 0.0
    error: str | None = None


@dataclass
class BudgetUse:
    app_id: str
    llm_id: str | None
    period: str
    mode: str
    spent_usd: float
    limit_usd: float | None
    tokens: int
    limit_tokens: int | None

    @property
    def used_pct(self) -> float:
        used = [self.spent_usd / self.limit_usd if self.limit_usd else None,
                self.tokens / self.limit_tokens if self.limit_tokens else None]
        return max((u for u in used if u is not None), default=0.0) * 100


@dataclass
class Snapshot:
    components: list[Health] = field(default_factory=list)
    tap_requests: float | None = None
    tap_rps: float = 0.0
    tap_rejected: float = 0.0
    spool_pending: float | None = None
    queue_depth: float | None = None
    kafka_connected: bool | None = None
    collectors: dict[str, CollectorStats] = field(default_factory=dict)
    budgets: list[BudgetUse] = field(default_factory=list)
    budget_note: str | None = None
    traffic: dict[str, int] | None = None


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> sample name -> value summed over label sets."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


class Monitor:
    """Samples ``stack`` every ``interval_s`` on a background thread; :attr:`snapshot` is the latest."""

    def __init__(self, stack: LocalStack, traffic: DemoTraffic | None = None, interval_s: float = 1.0) -> None:
        self.stack = stack
        self.traffic = traffic
        self.interval_s = interval_s
        self.snapshot = Snapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="up-monitor", daemon=True)
        self._last: dict[str, tuple[float, float]] = {}  # counter name -> (monotonic time, value)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        from gateway_tap.settings import load_config

        assert self.stack.config_path is not None
        config = load_config(self.stack.config_path)
        store: BudgetStore | None = None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            try:
                while not self._stop.is_set():
                    snap = Snapshot(components=await asyncio.to_thread(self._health))
                    await self._tap(session, snap)
                    ports = self.stack.collectors
                    snap.collectors = dict.fromkeys(ports, CollectorStats(error="not scraped"))
                    await asyncio.gather(*(self._collector(session, name, port, snap) for name, port in ports.items()))
                    store = await self._budgets(config, store, snap)
                    snap.traffic = self.traffic.counts() if self.traffic is not None else None
                    self.snapshot = snap
                    await asyncio.to_thread(self._stop.wait, self.interval_s)
            finally:
                if store is not None:
                    await store.close()

    def _health(self) -> list[Health]:
        out = []
        for c in list(self.stack.components):
            proc = c.process
            alive = c.alive()
            out.append(Health(c.name, proc.pid if proc else None, alive, alive and c.health(), c.endpoint))
        return out

    def _rate(self, key: str, value: float) -> float:
        now = time.monotonic()
        last = self._last.get(key)
        self._last[key] = (now, value)
        if last is None or now <= last[0] or value < last[1]:
            return 0.0
        return (value - last[1]) / (now - last[0])

    async def _scrape(self, session: aiohttp.ClientSession, url: str) -> dict[str, float] | str:
        try:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}"
                return parse_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return type(exc).__name__

    async def _tap(self, session: aiohttp.ClientSession, snap: Snapshot) -> None:
        metrics = await self._scrape(session, f"http://127.0.0.1:{self.stack.ports.tap_metrics}/metrics")
        if isinstance(metrics, str):
            return
        snap.tap_requests = metrics.get("gateway_tap_requests_total", 0.0)
        snap.tap_rps = self._rate("tap", snap.tap_requests)
        snap.tap_rejected = metrics.get("gateway_tap_rejected_requests_total", 0.0)
        snap.spool_pending = metrics.get("gateway_tap_publisher_spool_pending_events")
        snap.queue_depth = metrics.get("gateway_tap_publisher_queue_depth_events")
        connected = metrics.get("gateway_tap_publisher_kafka_connected")
        snap.kafka_connected = None if connected is None else connected > 0

    async def _collector(self, session: aiohttp.ClientSession, name: str, port: int, snap: Snapshot) -> None:
        metrics = await self._scrape(session, f"http://127.0.0.1:{port}/metrics")
        if isinstance(metrics, str):
            snap.collectors[name] = CollectorStats(error=metrics)
            return
        handled = metrics.get("gateway_tap_collector_events_handled_total", 0.0)
        snap.collectors[name] = CollectorStats(
            handled=handled, rate=self._rate(f"collector-{name}", handled),
            lag=metrics.get("gateway_tap_collector_consumer_lag", 0.0),
            dead_lettered=metrics.get("gateway_tap_collector_events_dead_lettered_total", 0.0))

    async def _budgets(self, config: GatewayConfig, store: BudgetStore | None, snap: Snapshot) -> BudgetStore | None:
        from gateway_tap.budgets.periods import micros_to_usd, period_start
        from gateway_tap.budgets.store import BudgetStoreError, open_store

        if not config.budgets:
            return store
        try:
            if store is None:
                store = await open_store(config.budget_store, migrate=False)
            now = datetime.now(UTC)
            for b in config.budgets:
                spend = await store.spend(b.app_id, b.llm_id, b.period, period_start(b.period, now))
                snap.budgets.append(BudgetUse(b.app_id, b.llm_id, b.period, b.mode, micros_to_usd(spend.cost_micros),
                                              b.limit_usd, spend.total_tokens, b.limit_tokens))
        except (BudgetStoreError, OSError, ValueError) as exc:
            # Before the budget collector's first batch the tables do not exist yet.
            snap.budgets = []
            snap.budget_note = "no usage recorded yet" if "no such table" in str(exc) else f"store: {exc}"
        return store


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def render(snap: Snapshot, endpoints: dict[str, str]) -> Group:
    """The panel, compact enough for a 24-line terminal: one row per component (health, endpoint, what
    flows through it), budget use, the demo traffic's outcomes, and where files, logs and config are."""
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True, pad_edge=False, title_justify="left",
                  title=f"[bold]gateway-tap up[/]  {sum(h.healthy for h in snap.components)}/"
                        f"{len(snap.components)} healthy")
    for col in ("component", "pid", "health", "ports", "total", "/s", "lag", "dlq"):
        table.add_column(col, justify="left" if col in ("component", "health", "ports") else "right", no_wrap=True)
    for h in snap.components:
        health = "[green]ok[/]" if h.healthy else "[yellow]down[/]" if h.alive else "[red]exited[/]"
        row = ["", "", "", ""]
        if h.name == "tap":
            row = [_num(snap.tap_requests), _num(snap.tap_rps, ",.1f"), "", ""]
        elif h.name.startswith("collector-"):
            c = snap.collectors.get(h.name.removeprefix("collector-"))
            if c is not None and c.error is None:
                row = [_num(c.handled), _num(c.rate, ",.1f"), f"[{'yellow' if c.lag else 'green'}]{c.lag:,.0f}[/]",
                       f"[{'red' if c.dead_lettered else 'green'}]{c.dead_lettered:,.0f}[/]"]
        table.add_row(h.name.replace("collector-", "collect "), str(h.pid or "-"), health, h.endpoint, *row)
    parts: list[Any] = [table]
    if snap.tap_requests is not None:
        kafka = "[green]connected[/]" if snap.kafka_connected else "[red]down: spooling to disk[/]"
        parts.append(Text.from_markup(f"[bold]tap[/]  kafka {kafka}, spool {_num(snap.spool_pending)} events, "
                                      f"queue {_num(snap.queue_depth)}, answered by the tap {_num(snap.tap_rejected)}"))
    for b in snap.budgets:
        colour = "red" if b.used_pct >= 100 else "yellow" if b.used_pct >= 80 else "green"
        limit = f"${b.spent_usd:,.4f} of ${b.limit_usd:,.2f}" if b.limit_usd is not None else \
            f"{b.tokens:,} of {b.limit_tokens:,} tokens"
        line = Text("budget ", style="bold")
        line.append(f"{b.app_id}{' x ' + b.llm_id if b.llm_id else ''} ", style="bold")
        line.append(f"{b.used_pct:.1f}%", style=colour)
        line.append(f"  {limit}, {b.period}, {b.mode}")
        parts.append(line)
    if not snap.budgets and snap.budget_note:
        parts.append(Text(f"budgets  {snap.budget_note}", style="dim"))
    if snap.traffic is not None:
        parts.append(Text("demo traffic  " + ", ".join(f"{k} {v:,}" for k, v in snap.traffic.items())))
    where = ", ".join(f"{k} {endpoints[k]}" for k in ("admin API", "files", "logs", "config") if endpoints.get(k))
    parts.append(Text(f"{where}\nCtrl-C stops everything", style="dim"))
    return Group(*parts)


def summary_line(snap: Snapshot) -> str:
    """One line for logs: health, request rate, events per collector, lag, spool, budgets, demo traffic."""
    down = [h.name for h in snap.components if not h.healthy]
    items = [f"health {'ok' if not down else 'DOWN: ' + ','.join(down)}",
             f"tap {_num(snap.tap_requests)} req ({snap.tap_rps:.1f}/s) spool {_num(snap.spool_pending)}"]
    for name, c in snap.collectors.items():
        items.append(f"{name} {'unreachable' if c.error else f'{c.handled:,.0f} ev lag {c.lag:,.0f}'}")
    if snap.budgets:
        items.append("budgets " + " ".join(f"{b.app_id} {b.used_pct:.0f}%" for b in snap.budgets))
    if snap.traffic is not None:
        items.append("demo " + " ".join(f"{k}={v}" for k, v in snap.traffic.items()))
    return " | ".join(items)


def show(monitor: Monitor, stopping: threading.Event, say: Callable[[str], None],
         interactive: bool | None = None) -> None:
    """Render until ``stopping`` is set: a Live panel on a terminal, a summary line through ``say`` every
    10 s otherwise.

    :raises OSError: the terminal went away (the caller stops the stack).
    """
    console = Console()
    endpoints = monitor.stack.endpoints()
    if interactive is None:
        interactive = console.is_terminal
    if not interactive:
        while not stopping.wait(PLAIN_INTERVAL_S):
            say(f"{datetime.now().strftime('%H:%M:%S')} {summary_line(monitor.snapshot)}")
        return
    # Refreshed from this thread only (no auto-refresh thread), so a terminal error reaches the caller.
    with Live(render(monitor.snapshot, endpoints), console=console, auto_refresh=False,
              screen=False, transient=False) as live:
        while not stopping.wait(1.0):
            try:
                live.update(render(monitor.snapshot, endpoints), refresh=True)
            except OSError:
                raise
            except Exception:
                continue  # a rendering glitch must never take the stack down
