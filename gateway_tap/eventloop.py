"""The event loop's health in every long-running process (tap workers, collector workers).

* :func:`tune_gc`: CPython's cycle collector made cheap for a server whose requests and events create no
  reference cycles (measured: see BENCHMARKS.md, "Tail latency").
* :class:`LoopLagMonitor`: ``gateway_tap_event_loop_lag_seconds``, how late the loop runs a timer that is due,
  sampled every ``loop_monitor.lag_interval_ms``: a stalled loop shows here before it shows in request latency.
* :class:`GcPauses`: ``gateway_tap_gc_pause_seconds``, each garbage collection's length, by generation.
* :class:`StallReporter` (``loop_monitor.log_stalls_over_ms``, a debug option): a watchdog thread pings the
  loop; when a ping waits longer than the threshold it samples the loop thread's stack (or notes the garbage
  collection that held it) and logs the longest stall of every window, naming what ran and for how long.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from gateway_tap.fast_metrics import FastHistogram
from gateway_tap.settings import LoopMonitorSettings

log = logging.getLogger(__name__)

LAG_METRIC = "gateway_tap_event_loop_lag_seconds"
GC_PAUSE_METRIC = "gateway_tap_gc_pause_seconds"
# From the timer's own resolution (1 ms in libuv) to a loop blocked for seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A young collection of what is in flight (tens of µs) to a full one over a large heap (seconds).
GC_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Freeze what start-up allocated and collect young objects rarely: call once the process serves.

    Neither a request in the tap nor an event in a collector leaves reference cycles behind (measured:
    ``gc.DEBUG_SAVEALL`` after thousands of requests finds only import-time garbage), so the collector only
    ever finds objects that reference counting frees anyway. With the default thresholds (700, 10, 10) it
    still ran every few hundred allocations: in a collector, re-walking the live batch took ~30% of decode
    time; in the tap, every few seconds a full collection walked every object start-up created (modules,
    the app, plugins, pydantic models), a pause of tens of milliseconds that made the tap's p99. Frozen
    objects are never scanned again; young collections with a higher threshold scan only what is in flight.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class LoopMetrics:
    """The loop's metrics on one registry: the tap's and each collector's declare them the same way."""

    def __init__(self, registry: CollectorRegistry, labelnames: Sequence[str] = ()) -> None:
        self.lag = Histogram(LAG_METRIC, "How late the event loop ran a timer that was due (sampled periodically).",
                             labelnames, buckets=LAG_BUCKETS, registry=registry)
        self.gc_pause = Histogram(GC_PAUSE_METRIC, "Time the process spent in one garbage collection (the event "
                                  "loop waits meanwhile), by generation.", (*labelnames, "generation"),
                                  buckets=GC_PAUSE_BUCKETS, registry=registry)


class GcPauses:
    """A ``gc.callbacks`` hook observing each collection's wall time into ``gateway_tap_gc_pause_seconds``.

    Two Python calls per collection: with :func:`tune_gc`'s thresholds, a few a minute.
    """

    def __init__(self, metrics: LoopMetrics, labels: Sequence[str] = ()) -> None:
        self._by_generation = [FastHistogram(metrics.gc_pause.labels(*labels, str(g))) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self)


class LoopLagMonitor:
    """Observes the loop's lag into a bound histogram child every ``interval_s`` while started.

    One timer per interval: at the default 100 ms, ten wake-ups a second. A stall shorter than the interval is
    seen when a sample falls inside it, so the histogram's tail measures how often the loop is not free.
    """

    def __init__(self, histogram: Any, interval_s: float) -> None:
        self._observe = FastHistogram(histogram).observe
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        interval, observe, clock = self.interval_s, self._observe, time.perf_counter
        while True:
            started = clock()
            await asyncio.sleep(interval)
            observe(max(0.0, clock() - started - interval))


@dataclass(frozen=True, slots=True)
class Stall:
    """One time the loop took longer than the threshold to run a ping: how long, and what held it."""

    duration_s: float
    culprit: str


class StallReporter:
    """A watchdog thread that names what blocked the loop (a debug option: a thread and ~100 pings/s).

    Every ``ping_every_s`` the thread schedules a no-op on the loop and waits for it. Past ``threshold_s`` it
    samples the loop thread's stack once (the blocking callback is running right then); when the ping finally
    runs, the stall's length is known. Garbage collections are timed by a ``gc.callbacks`` hook instead: one
    holds the GIL, so the watchdog can neither sample nor even post a ping while it runs. Every
    ``report_every_s`` the longest stall of the window is logged at WARNING with the number of stalls over
    the threshold.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold_s: float, report_every_s: float = 10.0,
                 ping_every_s: float = 0.01, logger: logging.Logger = log) -> None:
        self.loop = loop
        self.threshold_s = threshold_s
        self.report_every_s = report_every_s
        self.ping_every_s = ping_every_s
        self.log = logger
        self.reported: list[tuple[Stall, int]] = []
        """Every window's (longest stall, stalls over the threshold), as logged."""
        self._loop_thread = threading.get_ident()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._gc_started = 0.0
        self._last_gc: tuple[float, float] | None = None  # (start, end) of the last collection
        self._lock = threading.Lock()  # stalls are recorded by the watchdog and by the gc hook
        self._window_start = time.perf_counter()
        self._longest: Stall | None = None
        self._count = 0

    def start(self) -> None:
        """Start the watchdog; call from the loop's own thread."""
        if self._thread is not None:
            return
        self._loop_thread = threading.get_ident()
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._watch, name="loop-stall-reporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        thread.join(timeout=5)
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        self._flush()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ended = time.perf_counter()
        self._last_gc = (self._gc_started, ended)
        if ended - self._gc_started > self.threshold_s:
            self._record(Stall(ended - self._gc_started, f"garbage collection (generation {info['generation']})"))

    def _watch(self) -> None:
        self._window_start = time.perf_counter()
        while not self._stopping.is_set():
            pong = threading.Event()
            posted = time.perf_counter()
            try:
                self.loop.call_soon_threadsafe(pong.set)
            except RuntimeError:  # the loop closed
                return
            sample = None
            if not pong.wait(self.threshold_s):
                sample = self._sample()
                while not pong.wait(0.5):
                    if self._stopping.is_set():
                        return
            ended = time.perf_counter()
            if ended - posted > self.threshold_s and not self._mostly_gc(posted, ended):
                self._record(Stall(ended - posted, sample or "unknown (no Python frame was running)"))
            if ended - self._window_start >= self.report_every_s:
                self._flush()
            self._stopping.wait(self.ping_every_s)

    def _sample(self) -> str | None:
        frame = sys._current_frames().get(self._loop_thread)
        return describe_stack(frame) if frame is not None else None

    def _mostly_gc(self, posted: float, ended: float) -> bool:
        """A collection covered most of this stall: the gc hook recorded it already."""
        last_gc = self._last_gc
        return last_gc is not None and min(last_gc[1], ended) - max(last_gc[0], posted) > (ended - posted) / 2

    def _record(self, stall: Stall) -> None:
        with self._lock:
            self._count += 1
            if self._longest is None or stall.duration_s > self._longest.duration_s:
                self._longest = stall

    def _flush(self) -> None:
        with self._lock:
            longest, count = self._longest, self._count
            self._window_start, self._longest, self._count = time.perf_counter(), None, 0
        if longest is None:
            return
        self.reported.append((longest, count))
        self.log.warning("event loop blocked for %.1f ms by %s (%d stalls over %.0f ms in the last %.0f s)",
                         longest.duration_s * 1e3, longest.culprit, count, self.threshold_s * 1e3,
                         self.report_every_s, extra={"pid": os.getpid()})


class LoopHealth:
    """What every long-running process starts once it serves: the lag monitor, the GC pause hook, and the stall
    reporter when ``log_stalls_over_ms`` is set. ``labels`` are the values of ``metrics``' own label names."""

    def __init__(self, metrics: LoopMetrics, settings: LoopMonitorSettings, labels: Sequence[str] = ()) -> None:
        self.monitor = LoopLagMonitor(metrics.lag.labels(*labels) if labels else metrics.lag,
                                      settings.lag_interval_ms / 1e3)
        self.gc_pauses = GcPauses(metrics, labels)
        self.threshold_s = settings.log_stalls_over_ms / 1e3 if settings.log_stalls_over_ms is not None else None
        self.reporter: StallReporter | None = None

    def start(self) -> None:
        """Start on the running loop (idempotent)."""
        self.monitor.start()
        self.gc_pauses.install()
        if self.threshold_s is not None and self.reporter is None:
            self.reporter = StallReporter(asyncio.get_running_loop(), self.threshold_s)
            self.reporter.start()

    async def stop(self) -> None:
        await self.monitor.stop()
        self.gc_pauses.remove()
        if self.reporter is not None:
            await asyncio.to_thread(self.reporter.stop)
            self.reporter = None


def describe_stack(frame: FrameType, depth: int = 4) -> str:
    """``callback -> ... -> innermost (file:line)``: what the loop is running and where it is now.

    Frames up to the event loop's own (``asyncio``/``uvloop``: the process's main, ``run``, ``Handle._run``)
    are left out, so the first name shown is the callback or task the loop handed control to.
    """
    frames: list[FrameType] = []
    current: FrameType | None = frame
    while current is not None:
        frames.append(current)
        current = current.f_back
    frames.reverse()
    loop_frames = [i for i, f in enumerate(frames) if _LOOP_FILES.search(f.f_code.co_filename)]
    if loop_frames and loop_frames[-1] < len(frames) - 1:
        frames = frames[loop_frames[-1] + 1:]
    names = [f.f_code.co_qualname for f in frames]
    shown = names if len(names) <= depth else [names[0], "...", *names[-(depth - 1):]]
    inner = frames[-1]
    where = "/".join(inner.f_code.co_filename.rsplit("/", 2)[-2:])
    return f"{' -> '.join(shown)} ({where}:{inner.f_lineno})"


_LOOP_FILES = re.compile(r"[/\\](asyncio|uvloop)[/\\]")
