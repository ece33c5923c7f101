"""``gateway-tap up``: start the local stack, show its panel until Ctrl-C / SIGTERM / SIGHUP, stop it.

Sits above :mod:`gateway_tap.dev.stack` (the components) and :mod:`gateway_tap.dev.panel` (the view),
so neither imports the other's caller.

Whatever happens to the terminal, the stack is stopped: ``up``'s own lines go through :class:`Output`,
which never raises. When the reader of a pipe is gone (``make run | tee log`` after Ctrl-C: ``tee`` dies
first) or the terminal hung up, a write fails; that stops the stack (as SIGPIPE would stop any other
writer) instead of aborting the stop half-way and leaving every child running in its own session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import IO

from gateway_tap.dev.panel import Monitor, show
from gateway_tap.dev.servers import StartupError
from gateway_tap.dev.stack import Interrupted, LocalStack

DEMO_KEYS = {"demo": "gt-demo-key", "demo-tiny": "gt-demo-tiny-key"}
SOURCE_POLL_S = 0.5
"""How often ``--config`` is checked for changes (a stat; hashed only when it moved)."""


class Output:
    """``up``'s lines: to the terminal or pipe while it takes them, and to ``logs/up.log`` once it is open.

    :meth:`say` never raises: a failed write (EPIPE, EIO after a hang-up) marks the stream lost, sets
    ``lost`` (the caller stops the stack) and later lines go to the log only.
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream: IO[str] | None = stream if stream is not None else sys.stdout
        self.lost = threading.Event()
        self._log: IO[str] | None = None
        self._lock = threading.Lock()

    def open_log(self, path: Path) -> None:
        self._log = open(path, "a", buffering=1)  # line-buffered: readable while up runs

    def say(self, line: str, private: bool = False) -> None:
        """Print ``line``; ``private`` lines (a secret shown once) are not written to the log."""
        with self._lock:
            if self.stream is not None:
                try:
                    self.stream.write(line + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # ValueError: the stream was closed under us
                    _discard(self.stream)
                    self.stream = None
                    self.lost.set()
            if self._log is not None and not private:
                try:
                    self._log.write(line + "\n")
                except OSError:
                    self._log = None

    def close(self) -> None:
        with self._lock:
            if self._log is not None:
                self._log.close()
                self._log = None


def _discard(stream: IO[str]) -> None:
    """Point ``stream``'s file descriptor at /dev/null: what is still buffered (and anything rich or the
    interpreter's exit flush writes later) goes nowhere instead of failing again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def run_stack(stack: LocalStack, demo_traffic: bool = False, interactive: bool | None = None,
              output: Output | None = None) -> int:
    """Start ``stack``, show the panel until Ctrl-C/SIGTERM/SIGHUP (or the output is gone), then stop
    everything; returns the exit code."""
    out = output or Output()
    stack.say = out.say
    # Installed explicitly: a shell starting us in the background may have set SIGINT to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stack.stopping.set())
    watcher = threading.Thread(target=_stop_when_lost, args=(out, stack), name="up-output", daemon=True)
    watcher.start()
    traffic = None
    try:
        stack.prepare()
        out.open_log(stack.logs / "up.log")
        stack.start()
        _print_ready(stack, out)
        threading.Thread(target=_follow_source, args=(stack,), name="up-config", daemon=True).start()
        if demo_traffic:
            from gateway_tap.dev.demo_traffic import DemoTraffic

            traffic = DemoTraffic(f"http://127.0.0.1:{stack.ports.tap}", DEMO_KEYS)
            traffic.start()
        with Monitor(stack, traffic) as monitor:
            show(monitor, stack.stopping, out.say, interactive)
        return 0
    except Interrupted:
        return 0
    except StartupError as exc:
        stack.say(f"error: {exc}")
        return 1
    except OSError as exc:  # the terminal went away under the live panel
        out.lost.set()
        stack.say(f"output lost ({exc}): stopping")
        return 0
    finally:
        if traffic is not None:
            traffic.stop()
        started = bool(stack.components)
        stack.stop()
        if started:
            stack.say("stopped")
        out.close()


def _stop_when_lost(out: Output, stack: LocalStack) -> None:
    while not stack.stopping.is_set():
        if out.lost.wait(0.5):
            out.say("output closed (pipe reader or terminal gone): stopping")
            stack.stopping.set()


def _follow_source(stack: LocalStack) -> None:
    while not stack.stopping.wait(SOURCE_POLL_S):
        stack.follow_source()


def _print_ready(stack: LocalStack, out: Output) -> None:
    for name, url in stack.endpoints().items():
        out.say(f"  {name:<18} {url}")
    out.say("  demo keys          gt-demo-key (app demo), gt-demo-tiny-key (app demo-tiny, tiny budget)")
    token_file = (stack.state_dir / "admin-token").resolve()
    if stack.admin_token_created:  # shown this once (never logged); the file keeps it
        out.say(f"  admin token        {stack.admin_token}  (new, shown once; kept in {token_file}, mode 0600)",
                private=True)
    out.say(f"  admin CLI          export GATEWAY_TAP_ADMIN_URL=http://127.0.0.1:{stack.ports.admin} "
            f"GATEWAY_TAP_ADMIN_TOKEN=$(cat {token_file})")
    out.say(f"  status             gateway-tap status --config {stack.config_path}")
    out.say("ready; press Ctrl-C to stop")
