"""``make run 2>&1 | tee log`` in a terminal: every way the user stops it stops the whole stack.

The real thing, not a simulation: a pseudo-terminal is the controlling terminal of a shell
running ``make`` (a Makefile whose ``run`` target is the repo's recipe, ``gateway-tap up ...``)
piped into ``tee``, all in the terminal's foreground process group as an interactive shell
would run them. Then:

- ``ctrl-c``: ``^C`` typed on the terminal, so the line discipline sends SIGINT to the whole
  foreground group (``tee`` dies at once, before ``up`` writes its "stopping ..." lines);
- ``hangup``: the terminal closes (the master side of the pty): the shell gets SIGHUP and on its
  exit the kernel sends SIGHUP to the foreground group; writes to the terminal fail;
- ``sigint-up`` / ``sigterm-up``: ``kill -INT`` / ``kill -TERM`` of ``make``'s child only.

Each must end with every process of the stack gone and ``make`` exited.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import termios
import time
from pathlib import Path

import psutil
import pytest

from tests.support.up import READY_LINE, READY_TIMEOUT_S, ROOT, free_ports, kill_all, running, up_argv

STOP_TIMEOUT_S = 90.0


def _drain(master: int | None, sink: bytearray, timeout: float) -> None:
    """Read what the terminal shows (a pty whose output is never read blocks its writers)."""
    if master is None:
        time.sleep(timeout)
        return
    ready, _, _ = select.select([master], [], [], timeout)
    if ready:
        try:
            sink += os.read(master, 65536)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["ctrl-c", "hangup", "sigint-up", "sigterm-up"])
def test_make_run_piped_into_tee_stops_everything(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    up_command = " ".join(up_argv(state, free_ports()))
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"run:\n\t{up_command}\n")  # the repo's recipe: $(BIN)/gateway-tap up $(UP_ARGS)
    log = tmp_path / "run.log"
    master, slave = os.openpty()

    def controlling_terminal() -> None:
        # A terminal's session starts with default dispositions; a runner started under nohup (or with SIGHUP
        # ignored) would hand "ignore" down to the shell, which then outlives the hangup it must die of.
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    shell = subprocess.Popen(["bash", "-c", f"make -f {makefile} run 2>&1 | tee {log}"], stdin=slave,
                             stdout=slave, stderr=slave, cwd=ROOT, preexec_fn=controlling_terminal)
    os.close(slave)
    screen = bytearray()
    seen: dict[int, psutil.Process] = {}

    def record() -> list[psutil.Process]:
        for proc in psutil.Process(shell.pid).children(recursive=True):
            seen.setdefault(proc.pid, proc)
            try:  # the stack's children lead sessions of their own, still our descendants
                for child in proc.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                continue
        return [p for p in seen.values() if running(p)]

    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_LINE.encode() not in screen:
            assert shell.poll() is None, f"the shell exited with {shell.returncode}:\n{screen.decode(errors='replace')}"
            assert time.monotonic() < deadline, f"up not ready:\n{screen.decode(errors='replace')}"
            _drain(master, screen, 0.5)
        procs = record()
        cmdlines = {p.pid: " ".join(p.cmdline()) for p in procs}
        make = next(p for p in procs if p.name() == "make")
        up = next(p for p in procs if " up --state-dir" in cmdlines[p.pid])
        stack = [p for p in procs if p.pid != up.pid and up.pid in {a.pid for a in p.parents()}]
        assert len(stack) >= 6, cmdlines  # noida-db, the mock LLM, three collectors, the tap
        assert os.getpgid(up.pid) == os.tcgetpgrp(master)  # in the terminal's foreground group, like make

        if how == "ctrl-c":
            os.write(master, b"\x03")
        elif how == "hangup":
            os.close(master)
            master = None  # type: ignore[assignment]
        else:
            up.send_signal(signal.SIGINT if how == "sigint-up" else signal.SIGTERM)

        deadline = time.monotonic() + STOP_TIMEOUT_S
        while any(running(p) for p in [make, *stack]) and time.monotonic() < deadline:
            _drain(master, screen, 0.5)
        left = [f"{p.pid} {cmdlines.get(p.pid, '')}" for p in [make, up, *stack] if running(p)]
        up_log = (state / "logs" / "up.log").read_text(errors="replace") if (state / "logs" / "up.log").exists() \
            else ""
        assert not left, f"still running {STOP_TIMEOUT_S:.0f}s after {how}: {left}\nup.log:\n{up_log}"
        assert "stopping tap" in up_log and "stopped" in up_log, up_log
        assert not (state / "up.pids").exists()
    finally:
        if master is not None:
            os.close(master)
        kill_all([*seen.values()])
        if shell.poll() is None:
            shell.kill()
        shell.wait(10)


def test_output_survives_a_broken_pipe() -> None:
    """Unit check of the writer ``up`` prints through: a write into a pipe whose reader is gone marks the output
    lost (the stack is then stopped) instead of raising out of the stop sequence."""
    from gateway_tap.dev.up import Output

    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w") as stream:
        out = Output(stream)
        out.say("stopping tap ...")
        assert out.lost.is_set()
        out.say("stopping noida-db ...")  # and later lines do not raise either
