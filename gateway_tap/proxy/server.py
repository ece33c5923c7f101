"""``gateway-tap serve``: one worker in-process, or N worker processes sharing the port (SO_REUSEPORT).

With several workers the parent only supervises: it points ``PROMETHEUS_MULTIPROC_DIR``
at a fresh directory before spawning, so ``/metrics`` on any worker aggregates all of
them, restarts a worker that died, and on SIGTERM/SIGINT stops them all (each drains
its publisher into Kafka or its own spool ``<spool_dir>/worker-<n>``).
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
from types import FrameType

from gateway_tap.config import GatewayConfig, load_config

log = logging.getLogger(__name__)


def run_worker(config_path: str, worker_index: int, workers: int, port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM in this process, then drain (in-flight requests, then the publisher)."""
    import uvloop

    from gateway_tap.proxy.logs import configure_logging

    config = load_config(config_path)
    configure_logging(config.tap.log_level)
    uvloop.run(_serve_worker(config, worker_index, workers, port or config.tap.listen.port))


async def _serve_worker(config: GatewayConfig, worker_index: int, workers: int, port: int) -> None:
    from aiohttp import web

    from gateway_tap.proxy.app import create_app

    tap = await create_app(config, worker_index=worker_index)
    runner = web.AppRunner(tap.web_app, access_log=None, handle_signals=False, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, config.tap.listen.host, port, reuse_port=workers > 1)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Our own handlers: a second signal (the supervisor forwards the one the group already got) must not
    # interrupt the drain, as aiohttp's GracefulExit would.
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info("worker serving", extra={"worker": worker_index, "pid": os.getpid(), "port": port})
    await stop.wait()
    log.info("worker stopping", extra={"worker": worker_index, "pid": os.getpid()})
    await runner.cleanup()
    log.info("worker stopped", extra={"worker": worker_index, "publisher": tap.publisher.stats()})


def serve(config_path: str, workers: int | None = None, port: int | None = None) -> int:
    """Run the tap; returns the exit code."""
    config: GatewayConfig = load_config(config_path)
    count = workers or config.tap.workers
    if count == 1:
        run_worker(config_path, 0, 1, port)
        return 0
    from gateway_tap.proxy.logs import configure_logging

    configure_logging(config.tap.log_level)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-tap-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def spawn(index: int) -> BaseProcess:
        proc = ctx.Process(target=run_worker, args=(config_path, index, count, port),
                           name=f"gateway-tap-worker-{index}")
        proc.start()
        return proc

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    procs = {i: spawn(i) for i in range(count)}
    try:
        while not stopping:
            time.sleep(0.2)
            for index, proc in list(procs.items()):
                if not proc.is_alive() and not stopping:
                    log.warning("worker exited, restarting", extra={"worker": index, "exitcode": proc.exitcode})
                    _mark_dead(proc)
                    procs[index] = spawn(index)
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

