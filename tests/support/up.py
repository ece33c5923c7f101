"""``gateway-tap up`` as a subprocess on free ports, for the tests in ``tests/dev``.

Each test runs its own ``up`` (its own noida-db, mock LLM, tap and collectors) with a temp
state dir, so nothing is shared with the session fixtures or with other runs on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from gateway_tap.dev.servers import free_port
from gateway_tap.dev.stack import BUILTIN_COLLECTORS, Ports

ROOT = Path(__file__).resolve().parents[2]
PORT_OPTIONS = (*Ports.OPTIONS.values(), *(c.option for c in BUILTIN_COLLECTORS.values()))
"""Every port option of ``up``: a test passes them all, so it never touches a default port."""
READY_LINE = "ready; press Ctrl-C"
READY_TIMEOUT_S = 90.0


def free_ports(options: tuple[str, ...] = PORT_OPTIONS) -> dict[str, int]:
    """One free port per option, all different."""
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(options):
        ports = {option: free_port() for option in options}
    return ports


def up_argv(state_dir: Path, ports: dict[str, int], *extra: str) -> list[str]:
    """The ``gateway-tap up`` command line for ``state_dir`` and ``ports`` (option -> port)."""
    argv = [sys.executable, "-m", "gateway_tap", "up", "--state-dir", str(state_dir)]
    for option, port in ports.items():
        argv += [option, str(port)]
    return argv + list(extra)


def running(proc: psutil.Process) -> bool:
    """Still the same process (is_running checks the start time) and not a zombie awaiting its reaper."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process still running (and its process group: the stack's children lead their own)."""
    for proc in procs:
        if running(proc):
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                proc.kill()


@dataclass
class Up:
    """One ``gateway-tap up --plain`` subprocess and what it was given."""

    state_dir: Path
    ports: dict[str, int]
    demo_traffic: bool = False
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every descendant observed, by pid

    @property
    def tap_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--tap-port']}"

    @property
    def es_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--es-port']}"

    def start(self) -> Up:
        argv = up_argv(self.state_dir, self.ports, "--plain", *self.extra)
        if self.demo_traffic:
            argv.append("--demo-traffic")
        self.log = self.state_dir.parent / f"up-{time.monotonic_ns()}.log"
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            # Its own session, like a shell job: our signals reach it only when we send them.
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         start_new_session=True, env={**os.environ, **self.env})
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_LINE not in self.output():
            assert self.proc.poll() is None, f"up exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() < deadline, f"up not ready after {READY_TIMEOUT_S}s:\n{self.output()}"
            time.sleep(0.2)
        self.record_descendants()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def record_descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        children = psutil.Process(self.proc.pid).children(recursive=True)
        for child in children:
            self.seen.setdefault(child.pid, child)
        return children

    def child(self, part: str) -> psutil.Process:
        """The running descendant whose command line contains ``part``."""
        for proc in self.record_descendants():
            with contextlib.suppress(psutil.Error):
                if part in " ".join(proc.cmdline()):
                    return proc
        raise AssertionError(f"no child of up runs {part!r}")

    def stop(self, timeout: float = 90.0) -> None:
        """Ctrl-C as a shell job gets it; asserts a clean exit that leaves no process behind."""
        assert self.proc is not None
        self.record_descendants()
        self.proc.send_signal(signal.SIGINT)
        assert self.proc.wait(timeout=timeout) == 0, self.output()
        left = [f"{p.pid} {' '.join(p.cmdline())}" for p in self.seen.values() if running(p)]
        assert not left, f"still running after Ctrl-C: {left}"

    def cleanup(self) -> None:
        """Whatever a failed test left: SIGKILL ``up`` and every descendant seen (by pid, with its identity)."""
        if self.proc is not None and self.proc.poll() is None:
            self.record_descendants()
            self.proc.kill()
            self.proc.wait()
        kill_all(list(self.seen.values()))


def wait_for(check: Callable[[], object], timeout: float, what: str, up: Up) -> None:
    """Poll ``check`` until truthy; fails naming ``what`` (with up's output) on timeout or when up exited."""
    deadline = time.monotonic() + timeout
    while not check():
        assert up.proc is not None and up.proc.poll() is None, f"up exited while waiting for {what}:\n{up.output()}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s:\n{up.output()[-4000:]}"
        time.sleep(0.5)
