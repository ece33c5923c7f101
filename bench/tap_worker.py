"""Bench-only launcher: ``gateway-tap serve`` from a chosen checkout, optionally with the event layer off.

    python bench/tap_worker.py --root CHECKOUT --config tap.yaml [--workers N] [--no-events]

``--root`` puts that checkout first on ``sys.path`` (ahead of the editable install), so one bench run
measures two versions of the tap side by side (before/after) with the same interpreter and packages.

``--no-events`` is the bench's switch for the "no events" row, not a product setting (the tap always
publishes): each worker patches ``Exchange.events`` to return no events, so nothing is built, encoded,
queued or produced; metrics and everything else run as usual, and the publisher is started but stays idle.
Workers are started the way ``serve`` starts them (one in-process; N>1: N spawned processes sharing
the port with SO_REUSEPORT and a multiprocess metrics directory), running ``run_worker`` itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from typing import Any


def _no_events(self: Any, *args: Any, **kwargs: Any) -> list[Any]:
    return []


def worker(config_path: str, index: int, workers: int, events: bool) -> None:
    if not events:
        from gateway_tap.proxy.exchange import Exchange

        Exchange.events = _no_events  # type: ignore[method-assign]
    from gateway_tap.proxy.server import run_worker

    run_worker(config_path, index, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="The checkout whose gateway_tap is measured.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-events", action="store_true")
    args = parser.parse_args()
    events = not args.no_events
    if args.workers == 1:
        worker(args.config, 0, 1, events)
        return
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir = tempfile.mkdtemp(prefix="tap-bench-metrics-")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(args.config, i, args.workers, events)) for i in range(args.workers)]
    for proc in procs:
        proc.start()
    # The bench stops the whole process group; wait here so the workers drain before this process exits.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    for proc in procs:
        proc.join()
    shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, sys.argv[sys.argv.index("--root") + 1])
    main()
