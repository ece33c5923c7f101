"""``gateway-tap serve``: one worker in-process, or N worker processes sharing the port (SO_REUSEPORT).

With several workers the parent only supervises: it points ``PROMETHEUS_MULTIPROC_DIR``
at a fresh directory before spawning, so ``/metrics`` on any worker (``tap.metrics``, a
port they share like the proxy's) aggregates all of them, restarts a worker that died,
and on SIGTERM/SIGINT stops them all (each drains its publisher into Kafka or its own
spool ``<spool_dir>/worker-<n>``).

SIGHUP reloads the configuration file (:mod:`gateway_tap.proxy.reload`): each worker
reloads itself; the parent forwards the signal to every worker. Workers start with
SIGHUP blocked (inherited from the parent around the spawn) until their handler is in
place, so a reload requested while a worker starts is delivered, not fatal.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from gateway_tap.publisher.spool import adopt_orphan_spools
from gateway_tap.settings import ConfigFileError, GatewayConfig, load_config

log = logging.getLogger(__name__)

RESTART_RESET_S = 30.0
"""A worker that ran this long before dying is restarted at once (after 0.5 s)."""
RESTART_MAX_S = 30.0
"""Longest wait before restarting a worker that keeps dying young."""


def run_worker(config_path: str, worker_index: int, workers: int, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM in this process, then drain (in-flight requests, then the publisher)."""
    import uvloop

    from gateway_tap.proxy.logs import configure_logging

    early_hup: list[int] = []  # a SIGHUP before the event loop's handler exists: reload once serving
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    config = load_config(config_path)
    configure_logging(config.tap.log_level)
    uvloop.run(_serve_worker(config, worker_index, workers, port or config.tap.listen.port, config_path, early_hup))


async def _serve_worker(config: GatewayConfig, worker_index: int, workers: int, port: int,
                        config_path: str | None = None, early_hup: list[int] | None = None) -> None:
    from aiohttp import web

    from gateway_tap.eventloop import LoopHealth, tune_gc
    from gateway_tap.proxy.app import create_app
    from gateway_tap.proxy.protocol import TapRunner

    tap = await create_app(config, worker_index=worker_index, config_path=config_path)
    runner = TapRunner(tap.web_app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()  # starts the publisher: the admin state's first apply may send control messages
    admin = None
    if config.tap.admin.enabled:
        from gateway_tap.proxy.admin_link import AdminLink

        admin = await AdminLink.open(tap, worker_index=worker_index, workers=workers)
        await admin.start()
    site = web.TCPSite(runner, config.tap.listen.host, port, reuse_port=workers > 1)
    await site.start()
    metrics = config.tap.metrics
    metrics_runner = await tap.serve_metrics(metrics.host, metrics.port, reuse_port=workers > 1) \
        if metrics.port is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Our own handlers: a second signal (the supervisor forwards the one the group already got) must not
    # interrupt the drain, as aiohttp's GracefulExit would.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if tap.reloader is not None:
        loop.add_signal_handler(signal.SIGHUP, tap.reloader.request)
        if early_hup:
            tap.reloader.request("SIGHUP during start-up")
    tune_gc()  # everything start-up allocated is frozen: collections scan only what requests allocate
    loop_health = LoopHealth(tap.metrics.loop, config.loop_monitor)
    loop_health.start()
    log.info("worker serving", extra={"worker": worker_index, "pid": os.getpid(), "port": port})
    await stop.wait()
    log.info("worker stopping", extra={"worker": worker_index, "pid": os.getpid()})
    await loop_health.stop()
    if admin is not None:
        await admin.stop()
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("worker stopped", extra={"worker": worker_index, "publisher": tap.publisher.stats()})


def serve(config_path: str, workers: int | None = None, port: int | None = None) -> int:
    """Run the tap; returns the exit code.

    :raises ConfigFileError: the file is invalid, a plugin cannot load, or an admin token's environment variable
        is unset (each problem by key path), found here before any worker starts rather than by workers dying
        one after the other.
    """
    from gateway_tap.plugins.loader import validate_plugin_configs

    config: GatewayConfig = load_config(config_path)
    problems = validate_plugin_configs(config.plugins) + config.tap.admin.environment_problems()
    if problems:
        raise ConfigFileError(config_path, problems)
    count = workers or config.tap.workers
    # Before any worker opens its spool: spools of worker indexes this run will not have.
    adopt_orphan_spools(Path(config.tap.publisher.spool_dir), count)
    if count == 1:
        run_worker(config_path, 0, 1, port)
        return 0
    from gateway_tap.proxy.logs import configure_logging

    configure_logging(config.tap.log_level)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-tap-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    reload_requested = False

    def spawn(index: int) -> BaseProcess:
        proc = ctx.Process(target=run_worker, args=(config_path, index, count, port),
                           name=f"gateway-tap-worker-{index}")
        # The child inherits the blocked SIGHUP across exec and unblocks it once its handler is set;
        # here it stays pending until the unblock below, so the parent loses none either.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return proc

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def on_hup(signum: int, frame: FrameType | None) -> None:
        nonlocal reload_requested
        reload_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    procs = {i: spawn(i) for i in range(count)}
    started = dict.fromkeys(procs, time.monotonic())
    delays: dict[int, float] = {}
    restart_at: dict[int, float] = {}
    try:
        while not stopping:
            time.sleep(0.2)
            if reload_requested:
                reload_requested = False
                log.info("SIGHUP: workers reload the configuration", extra={"workers": len(procs)})
                for proc in procs.values():
                    if proc.is_alive() and proc.pid is not None:
                        os.kill(proc.pid, signal.SIGHUP)
            for index, proc in list(procs.items()):
                if proc.is_alive() or stopping or time.monotonic() < restart_at.get(index, 0.0):
                    continue
                if index not in restart_at:  # first noticed: log once, then wait out the backoff
                    _mark_dead(proc)
                    # A worker that dies young is likely to die again (bad plugin, port, disk):
                    # back off exponentially instead of respawning in a tight loop.
                    young = time.monotonic() - started[index] < RESTART_RESET_S
                    delays[index] = min(RESTART_MAX_S, delays.get(index, 0.5) * 2) if young else 0.5
                    restart_at[index] = time.monotonic() + delays[index]
                    log.warning("worker exited, restarting", extra={"worker": index, "exitcode": proc.exitcode,
                                                                     "in_s": delays[index]})
                    continue
                del restart_at[index]
                procs[index] = spawn(index)
                started[index] = time.monotonic()
    finally:
        for proc in procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            _mark_dead(proc)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _mark_dead(proc: BaseProcess) -> None:
    from prometheus_client import multiprocess

    if proc.pid is not None:
        multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]

