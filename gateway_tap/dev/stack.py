"""The components of ``gateway-tap up``: the whole local stack in the foreground.

Starts, as child processes through :mod:`gateway_tap.dev.servers` (the same code the
tests and benchmarks use): noida-db (Kafka + Elasticsearch), the mock LLM, the
``file``, ``elasticsearch``, ``budget`` and ``lake`` collectors and the tap, in that order,
and stops them in reverse order on Ctrl-C / SIGTERM (the tap first, so its events
reach Kafka and then the collectors before the broker goes).

Everything lives under the state dir (default ``.gateway-tap/``): the config
actually run (``gateway-tap.yaml``, the source config with this run's ports and
paths), noida's data, the tap's spool, the exported files, the Parquet lake (``lake/``), the SQLite budget
store, ``logs/*.log``, and ``up.pids``: every child's pid, start time and command
line, so the next ``up`` after a crash (``up`` SIGKILLed, children orphaned) stops
the leftovers that are still ours before it starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import click
import orjson
import yaml

from gateway_tap.dev.servers import (
    LOCAL_EXTRA_HINT,
    ManagedProcess,
    NoidaServer,
    StartupError,
    cli_argv,
    http_ok,
    missing_local_extra,
    mock_llm_process,
)

COLLECTORS = ("file", "elasticsearch", "budget", "lake")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StackError(click.ClickException):
    """``up`` cannot start: the message says what to change."""


@dataclass(frozen=True)
class Ports:
    """Fixed default ports of the local stack; each is overridable by the ``up`` option named in OPTIONS."""

    tap: int = 8080
    kafka: int = 9092
    es: int = 9200
    mock: int = 8090
    file_metrics: int = 9465
    es_metrics: int = 9466
    budget_metrics: int = 9467
    lake_metrics: int = 9468

    OPTIONS = {"tap": "--tap-port", "kafka": "--kafka-port", "es": "--es-port", "mock": "--mock-port",
               "file_metrics": "--file-metrics-port", "es_metrics": "--es-metrics-port",
               "budget_metrics": "--budget-metrics-port", "lake_metrics": "--lake-metrics-port"}

    def collector_metrics(self, name: str) -> int:
        return {"file": self.file_metrics, "elasticsearch": self.es_metrics, "budget": self.budget_metrics,
                "lake": self.lake_metrics}[name]

    def items(self) -> list[tuple[str, int]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port`` (TIME_WAIT leftovers do not count, as for the servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: Ports) -> None:
    """:raises StackError: naming each busy port and the option that changes it."""
    busy = [f"port {port} ({name.replace('_', ' ')}) is in use: stop what listens there or pass "
            f"{Ports.OPTIONS[name]} PORT" for name, port in ports.items() if port_in_use(port)]
    numbers = [port for _, port in ports.items()]
    if len(set(numbers)) < len(numbers):
        busy.append(f"two components were given the same port ({', '.join(f'{n}={p}' for n, p in ports.items())})")
    if busy:
        raise StackError("\n".join(busy))


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def write_stack_config(source: Path, state_dir: Path, ports: Ports) -> Path:
    """``source`` with this run's ports and state paths, validated, written to ``<state_dir>/gateway-tap.yaml``.

    Rewritten: the Kafka bootstrap, the tap's port and spool, LLM upstreams on loopback (the mock),
    the budget store (SQLite under the state dir), and the four collectors (added when missing),
    each with its metrics port; the file collector writes to ``<state_dir>/events``, the lake collector to
    ``<state_dir>/lake`` (unless the source gives it an ``s3`` destination; objects every 10 s by default).

    :raises StackError: the source is unreadable or the result is invalid (key paths named).
    """
    from gateway_tap.settings import ConfigFileError, parse_config

    try:
        doc = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"cannot read {source}: {exc}") from None
    if not isinstance(doc, dict):
        raise StackError(f"{source}: expected a mapping at the top level")
    state = state_dir.resolve()
    doc.setdefault("kafka", {})["bootstrap_servers"] = f"127.0.0.1:{ports.kafka}"
    tap = doc.setdefault("tap", {})
    tap["listen"] = {**(tap.get("listen") or {}), "host": "127.0.0.1", "port": ports.tap}
    tap.setdefault("publisher", {})["spool_dir"] = str(state / "spool")
    for llm in doc.get("llms") or []:
        if isinstance(llm, dict) and urlsplit(str(llm.get("upstream_url", ""))).hostname in LOOPBACK:
            llm["upstream_url"] = _with_port(str(llm["upstream_url"]), ports.mock)
    doc["budget_store"] = {**(doc.get("budget_store") or {}), "backend": "sqlite",
                           "sqlite_path": str(state / "budgets.sqlite3")}
    collectors = doc.setdefault("collectors", {})
    for name in COLLECTORS:
        entry = collectors.setdefault(name, {})
        entry.setdefault("group_instance_id", f"{name}-1")  # a restarted collector takes over at once
        entry["metrics"] = {**(entry.get("metrics") or {}), "host": "127.0.0.1", "port": ports.collector_metrics(name)}
        config = entry.setdefault("config", {})
        if name == "file":
            config["directory"] = str(state / "events")
        elif name == "elasticsearch":
            config["hosts"] = [f"http://127.0.0.1:{ports.es}"]
        elif name == "lake":
            if "s3" not in config:
                config["directory"] = str(state / "lake")
            config.setdefault("rotate_interval_ms", 10_000)  # a local stack shows its data within ~15 s
    target = state / "gateway-tap.yaml"
    try:
        parse_config(doc, source)
    except ConfigFileError as exc:
        raise StackError(str(exc)) from None
    header = (f"# Written by `gateway-tap up` from {source.resolve()} with this run's ports and paths;\n"
              "# rewritten at every start, edit the source instead.\n")
    target.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return target


# --- stale state -------------------------------------------------------------------------------------


@dataclass
class ChildRecord:
    """What identifies a child across ``up`` runs: pid plus start time and command line (pids are reused)."""

    name: str
    pid: int
    create_time: float
    cmdline: list[str]


class PidFile:
    """``<state>/up.pids``: the children of the running ``up``, rewritten after each spawn."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.children: list[ChildRecord] = []

    def read(self) -> list[ChildRecord]:
        try:
            data = orjson.loads(self.path.read_bytes())
            return [ChildRecord(**c) for c in data.get("children", [])]
        except (OSError, orjson.JSONDecodeError, TypeError):
            return []

    def add(self, name: str, pid: int, argv: list[str]) -> None:
        """Record a child just spawned with ``argv``.

        ``argv`` is what we asked for, not what /proc shows now: right after the fork the
        child may not have exec'd yet and still show our own command line.
        """
        import psutil

        try:
            proc = psutil.Process(pid)
            self.children.append(ChildRecord(name, pid, proc.create_time(), list(argv)))
        except psutil.Error:
            return  # already gone: nothing to clean up later
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps({"up_pid": os.getpid(), "children": [c.__dict__ for c in self.children]},
                                     option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.children = []
        self.path.unlink(missing_ok=True)


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return bool(proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def kill_leftovers(records: list[ChildRecord], state_dir: Path, say: Callable[[str], None],
                   timeout: float = 15.0) -> list[int]:
    """Stop recorded children that are still alive and still ours (same start time and command line),
    newest first, with their whole process groups: SIGINT (noida keeps its data), then SIGKILL.
    Also any noida-db still serving this state dir's data (a crash between its spawn and the record).
    Returns the pids stopped."""
    import psutil

    victims: list[tuple[str, Any]] = []
    for rec in reversed(records):
        try:
            proc = psutil.Process(rec.pid)
            if abs(proc.create_time() - rec.create_time) < 0.05 and proc.cmdline() == rec.cmdline and _alive(proc):
                victims.append((rec.name, proc))
        except psutil.Error:
            continue
    data_dir = str((state_dir / "noida").resolve())
    known = {p.pid for _, p in victims}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if proc.pid not in known and "--data-dir" in cmd and data_dir in cmd and _alive(proc):
            victims.append(("noida-db", proc))
    for name, proc in victims:
        say(f"stopping leftover {name} (pid {proc.pid}) from a previous run")
        _signal_group(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while _alive(proc) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(proc):
            _signal_group(proc.pid, signal.SIGKILL)
            while _alive(proc) and time.monotonic() < deadline + 5:
                time.sleep(0.05)
    return [p.pid for _, p in victims]


def _signal_group(pid: int, signum: int) -> None:
    # Children run in their own sessions (pgid == pid); fall back to the pid if it left its group.
    try:
        os.killpg(pid, signum)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def remove_stale_locks(state_dir: Path) -> list[Path]:
    """noida's control file names the pid that served the data dir; remove it when that process is gone."""
    import psutil

    removed: list[Path] = []
    control = state_dir / "noida" / "noida.control.json"
    try:
        pid = int(orjson.loads(control.read_bytes()).get("pid", 0))
    except (OSError, orjson.JSONDecodeError, ValueError, AttributeError):
        return removed
    if not pid or not psutil.pid_exists(pid) or not _alive(psutil.Process(pid)):
        control.unlink(missing_ok=True)
        removed.append(control)
    return removed


def acquire_lock(state_dir: Path) -> IO[bytes]:
    """Exclusive lock on ``<state>/up.lock`` for as long as ``up`` runs (the kernel drops it when we die).

    :raises StackError: another ``up`` runs with this state dir.
    """
    handle = open(state_dir / "up.lock", "a+b")  # held open (and locked) for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StackError(f"another `gateway-tap up` is running with state dir {state_dir}: stop it first, "
                         "or pass --state-dir DIR (and other ports) to run a second stack") from None
    return handle


# --- the stack ---------------------------------------------------------------------------------------


@dataclass
class Component:
    """One child of the stack: how to start it and how to tell it is healthy."""

    name: str
    runner: NoidaServer | ManagedProcess
    health: Callable[[], bool]
    endpoint: str = ""

    @property
    def process(self) -> ManagedProcess | None:
        return self.runner.process if isinstance(self.runner, NoidaServer) else self.runner

    def alive(self) -> bool:
        proc = self.process
        return proc is not None and proc.running()

    @property
    def log_path(self) -> Path | None:
        proc = self.process
        return proc.log_path if proc is not None else None


class Interrupted(Exception):
    """Ctrl-C / SIGTERM arrived while the stack was starting."""


@dataclass
class LocalStack:
    """The components of the local stack, started in order and stopped in reverse.

    :param config_source: the config to run (by default the packaged demo config,
        :data:`gateway_tap.examples.DEMO_CONFIG`).
    :param state_dir: data, logs, the generated config and ``up.pids`` (``.gateway-tap/`` by default).
    :param ports: every listening port (see :class:`Ports`).
    :param say: where progress lines go.
    """

    config_source: Path
    state_dir: Path
    ports: Ports = field(default_factory=Ports)
    say: Callable[[str], None] = click.echo
    stopping: threading.Event = field(default_factory=threading.Event)
    components: list[Component] = field(default_factory=list)
    config_path: Path | None = None
    _lock: IO[bytes] | None = None
    _pids: PidFile | None = None

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def prepare(self) -> None:
        """Lock the state dir, clean up after a crashed run, check the ports, write the config."""
        missing = missing_local_extra()
        if missing:
            raise StackError(f"gateway-tap up needs {' and '.join(missing)}: {LOCAL_EXTRA_HINT}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._lock = acquire_lock(self.state_dir)
        self._pids = PidFile(self.state_dir / "up.pids")
        kill_leftovers(self._pids.read(), self.state_dir, self.say)
        for path in remove_stale_locks(self.state_dir):
            self.say(f"removed stale {path}")
        self._pids.clear()
        check_ports(self.ports)
        self.config_path = write_stack_config(self.config_source, self.state_dir, self.ports)

    def start(self) -> None:
        """Start every component in order, each ready before the next; raises :class:`Interrupted` on a signal."""
        if self.config_path is None:
            self.prepare()
        assert self.config_path is not None
        p, logs, cfg = self.ports, self.logs, str(self.config_path.resolve())
        noida = NoidaServer(data_dir=(self.state_dir / "noida").resolve(), kafka_port=p.kafka, es_port=p.es,
                            log_path=logs / "noida.log")
        self._start(Component("noida-db", noida, lambda: http_ok(noida.es_url + "/") and noida.process is not None
                              and noida.process.running(), f":{p.kafka} :{p.es}"))
        mock = mock_llm_process(p.mock, log_path=logs / "mock-llm.log")
        self._start(Component("mock-llm", mock, lambda: http_ok(f"http://127.0.0.1:{p.mock}/healthz"),
                              f":{p.mock}"))
        # The collectors start together (each takes a few seconds to import and join its group).
        batch = []
        for name in COLLECTORS:
            port = p.collector_metrics(name)
            proc = ManagedProcess(f"collector-{name}", cli_argv("collect", name, "--config", cfg),
                                  log_path=logs / f"collector-{name}.log", start_timeout=60.0, stop_timeout=40.0)
            batch.append(Component(f"collector-{name}", proc, _health(f"http://127.0.0.1:{port}/healthz"),
                                   f":{port}"))
        self._start(*batch)
        tap = ManagedProcess("tap", cli_argv("serve", "--config", cfg), log_path=logs / "tap.log",
                             start_timeout=60.0, stop_timeout=30.0)
        self._start(Component("tap", tap, _health(f"http://127.0.0.1:{p.tap}/readyz"), f":{p.tap}"))

    def _start(self, *components: Component) -> None:
        for c in components:
            if self.stopping.is_set():
                raise Interrupted
            self.say(f"starting {c.name} ...")
            self.components.append(c)
            if isinstance(c.runner, NoidaServer):
                c.runner.start()  # blocks until ready (a few seconds); recorded right after
            else:
                c.runner.start()  # no ready probe: returns at once, so the pid is recorded before we wait
            if c.process is not None and c.process.pid is not None and self._pids is not None:
                self._pids.add(c.name, c.process.pid, list(c.process.argv))
        for c in components:
            self._wait_ready(c)

    def _wait_ready(self, c: Component) -> None:
        proc = c.process
        assert proc is not None
        deadline = time.monotonic() + proc.start_timeout
        while not c.health():
            if self.stopping.is_set():
                raise Interrupted
            if not proc.running():
                raise StartupError(f"{c.name} exited with {proc.proc.returncode if proc.proc else '?'} "
                                   f"(log {c.log_path}):\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise StartupError(f"{c.name} not ready after {proc.start_timeout:.0f}s (log {c.log_path}):\n"
                                   f"{proc.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every started component in reverse order (each: signal its group, wait, then SIGKILL)."""
        while self.components:
            c = self.components.pop()
            try:
                if c.alive():
                    self.say(f"stopping {c.name} ...")
                c.runner.stop()
            except Exception as exc:  # one failed stop must not leave the components after it running
                self.say(f"stopping {c.name} failed: {exc!r}")
        if self._pids is not None:
            self._pids.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def endpoints(self) -> dict[str, str]:
        p = self.ports
        return {
            "tap": f"http://127.0.0.1:{p.tap}/llm/openai/v1  (and /llm/anthropic)",
            "tap metrics": f"http://127.0.0.1:{p.tap}/metrics",
            "kafka": f"127.0.0.1:{p.kafka}",
            "elasticsearch": f"http://127.0.0.1:{p.es}",
            "mock LLM": f"http://127.0.0.1:{p.mock}/v1",
            "collector metrics": ", ".join(f"{n} :{p.collector_metrics(n)}" for n in COLLECTORS),
            "files": str((self.state_dir / "events").resolve()),
            "lake (Parquet)": str((self.state_dir / "lake").resolve()),
            "budget store": str((self.state_dir / "budgets.sqlite3").resolve()),
            "logs": str(self.logs.resolve()),
            "config": str(self.config_path) if self.config_path else "",
        }


def _health(url: str) -> Callable[[], bool]:
    return lambda: http_ok(url)
