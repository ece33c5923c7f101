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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import click
import orjson
import yaml

from gateway_tap.apps import hash_key
from gateway_tap.config_reload import FileFingerprint
from gateway_tap.dev.servers import (
    LOCAL_EXTRA_HINT,
    ManagedProcess,
    NoidaServer,
    StartupError,
    cli_argv,
    free_port,
    http_ok,
    missing_local_extra,
    mock_llm_process,
)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ADMIN_TOKEN_ID = "up-local"


class StackError(click.ClickException):
    """``up`` cannot start: the message says what to change."""


LocalConfig = Callable[[Path, "Ports", dict[str, Any]], dict[str, Any]]
"""(state dir, ports, the collector's ``config`` as declared) -> the keys of that config ``up`` sets."""


@dataclass(frozen=True)
class BuiltinCollector:
    """A collector ``up`` runs whatever ``--config`` declares: the ``up`` option of its metrics port, that
    port's default, and the keys of its ``config`` that ``up`` points at the state dir or its own servers."""

    option: str
    metrics_port: int
    local_config: LocalConfig = lambda state, ports, declared: {}


def _lake_config(state: Path, ports: Ports, declared: dict[str, Any]) -> dict[str, Any]:
    local = {} if "s3" in declared else {"directory": str(state / "lake")}
    return local | {"rotate_interval_ms": declared.get("rotate_interval_ms", 10_000)}  # data within ~15 s


BUILTIN_COLLECTORS: dict[str, BuiltinCollector] = {
    "file": BuiltinCollector("--file-metrics-port", 9465, lambda state, ports, declared: {
        "directory": str(state / "events")}),
    "elasticsearch": BuiltinCollector("--es-metrics-port", 9466, lambda state, ports, declared: {
        "hosts": [f"http://127.0.0.1:{ports.es}"]}),
    "budget": BuiltinCollector("--budget-metrics-port", 9467),
    "lake": BuiltinCollector("--lake-metrics-port", 9468, _lake_config),  # unless the source gives it s3
}
"""Adding a collector to every ``up`` is one entry here (its port option is generated from it)."""


def _builtin_ports() -> dict[str, int]:
    return {name: c.metrics_port for name, c in BUILTIN_COLLECTORS.items()}


@dataclass(frozen=True)
class Ports:
    """Default ports of the local stack; each is overridable by the ``up`` option named in OPTIONS (the
    built-in collectors' metrics ports by the option in :data:`BUILTIN_COLLECTORS`)."""

    tap: int = 8080
    admin: int = 8081
    kafka: int = 9092
    es: int = 9200
    mock: int = 8090
    collectors: dict[str, int] = field(default_factory=_builtin_ports)
    """Metrics port of each built-in collector."""
    tap_metrics: int = 9464
    """The tap's ``/metrics`` (``tap.metrics``: a listener of its own, not the proxy's port)."""

    OPTIONS: ClassVar[dict[str, str]] = {"tap": "--tap-port", "admin": "--admin-port", "kafka": "--kafka-port",
                                         "es": "--es-port", "mock": "--mock-port",
                                         "tap_metrics": "--tap-metrics-port"}

    def items(self) -> list[tuple[str, int, str]]:
        """(what, port, the option that changes it) for every port."""
        fixed = [(name, getattr(self, name), option) for name, option in self.OPTIONS.items()]
        return fixed + [(f"{name} metrics", self.collectors[name], c.option) for name, c in BUILTIN_COLLECTORS.items()]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on ``host:port`` (TIME_WAIT leftovers do not count, as for the servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(ports: Ports, collectors: dict[str, int] | None = None, source: Path | None = None) -> None:
    """:raises StackError: naming each busy port and the option (or, for a collector of ``--config``, the key)
    that changes it."""
    named = [(what, port, f"pass {option} PORT") for what, port, option in ports.items()]
    named += [(f"{name} metrics", port, f"set collectors.{name}.metrics.port in {source}")
              for name, port in (collectors or {}).items() if name not in BUILTIN_COLLECTORS]
    busy = [f"port {port} ({what}) is in use: stop what listens there or {fix}"
            for what, port, fix in named if port_in_use(port)]
    numbers = [port for _, port, _ in named]
    if len(set(numbers)) < len(numbers):
        busy.append(f"two components were given the same port ({', '.join(f'{w}={p}' for w, p, _ in named)})")
    if busy:
        raise StackError("\n".join(busy))


def _is_the_mock(url: str) -> bool:
    """An upstream on loopback at the mock LLM's default port (as in the demo config) is ``up``'s mock."""
    parts = urlsplit(url)
    try:
        return parts.hostname in LOOPBACK and parts.port == Ports.mock
    except ValueError:  # a malformed port: parse_config names it
        return False


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


def ensure_admin_token(state_dir: Path) -> tuple[str, bool]:
    """The local admin token in ``<state>/admin-token`` (mode 0600), created on first use; (token, created).

    Only its hash goes into the generated config; the token itself stays in this file.
    """
    import secrets

    path = state_dir / "admin-token"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # someone widened it: the token is an admin credential
        token = path.read_text().strip()
        if token:
            return token, False
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    token = "gt-admin-" + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, True


@dataclass
class StackConfig:
    """What :func:`write_stack_config` wrote."""

    path: Path
    """The generated config every component runs."""
    collectors: dict[str, int]
    """Every collector ``up`` runs (the built-in ones, then those of ``--config``) and its metrics port."""
    replaced: list[str]
    """``key: declared -> used`` for each value ``--config`` declares that ``up`` replaces."""


class _Doc:
    """The source document being rewritten; records what it declared that ``up`` replaces."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.replaced: list[str] = []

    def put(self, dotted: str, value: Any, node: dict[str, Any] | None = None, label: str | None = None) -> None:
        """Set ``dotted`` (below ``node``, the root by default; ``label`` names it in :attr:`replaced`)."""
        *parents, key = dotted.split(".")
        node = self.doc if node is None else node
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        old = node.get(key)
        if old is not None and not _same(old, value):
            self.replaced.append(f"{label or dotted}: {old!r} -> {value!r}")
        node[key] = value


def _same(declared: Any, used: Any) -> bool:
    """Equal, with a relative path taken from the current directory as up does."""
    if declared == used:
        return True
    if isinstance(declared, str) and isinstance(used, str) and used.startswith("/"):
        return Path(declared).resolve() == Path(used)
    return False


def write_stack_config(source: Path, state_dir: Path, ports: Ports, admin_token_hash: str | None = None,
                       collector_ports: dict[str, int] | None = None) -> StackConfig:
    """``source`` with this run's ports and state paths, validated, written to ``<state_dir>/gateway-tap.yaml``.

    Rewritten: the Kafka bootstrap, the tap's port and spool, LLM upstreams at 127.0.0.1:8090 (the mock),
    the budget store (SQLite under the state dir), the admin API (``ports.admin``, with the local token
    ``admin_token_hash`` besides any the source declares), the built-in collectors (added when missing)
    with their metrics ports and local settings (files, the lake under the state dir unless the source gives
    the lake an ``s3`` destination; lake objects every 10 s by default). Collectors of the source keep
    their own metrics port when they set one, else get the one in ``collector_ports`` or a free one. Every
    other key is the source's, so a reload of the generated file applies the source as written.

    :raises StackError: the source is unreadable or the result is invalid, plugin configs included (key paths
        named).
    """
    from gateway_tap.plugins.loader import validate_plugin_configs
    from gateway_tap.settings import ConfigFileError, parse_config

    try:
        doc = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"cannot read {source}: {exc}") from None
    if not isinstance(doc, dict):
        raise StackError(f"{source}: expected a mapping at the top level")
    state = state_dir.resolve()
    out = _Doc(doc)
    out.put("kafka.bootstrap_servers", f"127.0.0.1:{ports.kafka}")
    out.put("tap.listen.host", "127.0.0.1")
    out.put("tap.listen.port", ports.tap)
    out.put("tap.metrics.host", "127.0.0.1")
    out.put("tap.metrics.port", ports.tap_metrics)
    out.put("tap.publisher.spool_dir", str(state / "spool"))
    for llm in doc.get("llms") or []:
        if isinstance(llm, dict) and _is_the_mock(str(llm.get("upstream_url", ""))):
            out.put("upstream_url", _with_port(str(llm["upstream_url"]), ports.mock), llm,
                    f"llms[{llm.get('id')}].upstream_url")
    out.put("budget_store.backend", "sqlite")
    out.put("budget_store.sqlite_path", str(state / "budgets.sqlite3"))
    if admin_token_hash is not None:
        out.put("tap.admin.listen.host", "127.0.0.1")
        out.put("tap.admin.listen.port", ports.admin)
        admin = doc["tap"]["admin"]
        tokens = [t for t in admin.get("tokens") or [] if not (isinstance(t, dict) and t.get("id") == ADMIN_TOKEN_ID)]
        admin["tokens"] = [*tokens, {"id": ADMIN_TOKEN_ID, "role": "admin", "token_hash": admin_token_hash}]
    collectors = doc.get("collectors")
    if not isinstance(collectors, dict):
        collectors = doc["collectors"] = {}
    for name in BUILTIN_COLLECTORS:
        if not isinstance(collectors.get(name), dict):
            collectors[name] = {}
    chosen = dict(collector_ports or {})
    metrics_ports: dict[str, int] = {}
    for name in [*BUILTIN_COLLECTORS, *(n for n in collectors if n not in BUILTIN_COLLECTORS)]:
        entry = collectors[name]
        if not isinstance(entry, dict):
            continue  # invalid: parse_config below names it
        entry.setdefault("group_instance_id", f"{name}-1")  # a restarted collector takes over at once
        builtin = BUILTIN_COLLECTORS.get(name)
        metrics = entry.get("metrics")
        declared = metrics.get("port") if isinstance(metrics, dict) else None
        if builtin is not None:
            port = ports.collectors[name]
        elif isinstance(declared, int) and declared > 0:
            port = declared
        else:  # the panel and the readiness check need one
            port = chosen.get(name) or free_port()
        metrics_ports[name] = port
        out.put(f"collectors.{name}.metrics.host", "127.0.0.1")
        out.put(f"collectors.{name}.metrics.port", port)
        declared_config = entry.get("config")
        if not isinstance(declared_config, dict):
            declared_config = {}
        for key, value in (builtin.local_config(state, ports, declared_config) if builtin else {}).items():
            out.put(f"collectors.{name}.config.{key}", value)
    target = state / "gateway-tap.yaml"
    try:
        problems = validate_plugin_configs(parse_config(doc, source).plugins)  # as check-config and the tap do
    except ConfigFileError as exc:
        raise StackError(str(exc)) from None
    if problems:
        raise StackError(str(ConfigFileError(source, problems)))
    header = (f"# Written by `gateway-tap up` from {source.resolve()} with this run's ports and paths;\n"
              "# rewritten whenever that file changes: edit it instead.\n")
    tmp = target.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, target)  # whole: a tap watching the file never reads half of it
    return StackConfig(target, metrics_ports, out.replaced)


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
    generated: StackConfig | None = None
    admin_token: str = ""
    admin_token_created: bool = False
    _lock: IO[bytes] | None = None
    _pids: PidFile | None = None
    _source: FileFingerprint | None = None

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def config_path(self) -> Path | None:
        """The generated config every component runs."""
        return self.generated.path if self.generated is not None else None

    @property
    def collectors(self) -> dict[str, int]:
        """Every collector this stack runs, with its metrics port."""
        return dict(self.generated.collectors) if self.generated is not None else {}

    def prepare(self) -> None:
        """Lock the state dir, clean up after a crashed run, write the config, check the ports."""
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
        self.admin_token, self.admin_token_created = ensure_admin_token(self.state_dir)
        self._source = FileFingerprint(self.config_source)
        self._source.remember()
        self.generated = self._write_config()
        if self.generated.replaced:
            self.say(f"{self.config_source} runs as written except (up runs its own servers, under "
                     f"{self.state_dir}):")
            for line in self.generated.replaced:
                self.say(f"  {line}")
        check_ports(self.ports, self.generated.collectors, self.config_source)

    def _write_config(self) -> StackConfig:
        return write_stack_config(self.config_source, self.state_dir, self.ports, hash_key(self.admin_token),
                                  self.collectors)

    def follow_source(self) -> None:
        """When ``--config`` changed, rewrite the generated config from it, so that a reload of the tap
        (SIGHUP, or ``tap.reload.watch``) or of a collector (SIGHUP) applies the file as now written.
        Says what happened; an invalid file leaves the generated config as it was."""
        if self._source is None or self.generated is None or not self._source.changed():
            return
        before = self.generated
        try:
            self.generated = self._write_config()
        except StackError as exc:
            self.say(f"{self.config_source} changed but is invalid; the stack runs the previous version:\n"
                     f"{exc.message}")
            return
        tap = next((c.process.pid for c in self.components if c.name == "tap" and c.process is not None), None)
        self.say(f"{self.config_source} changed: {self.generated.path} rewritten; the tap applies it with "
                 f"tap.reload.watch: true or on SIGHUP (kill -HUP {tap}), a collector on SIGHUP")
        for name in self.generated.collectors.keys() - before.collectors.keys():
            self.say(f"  collector {name} is new: restart up to run it")
        for name in before.collectors.keys() - self.generated.collectors.keys():
            self.say(f"  collector {name} was removed: it runs until up restarts")

    def start(self) -> None:
        """Start every component in order, each ready before the next; raises :class:`Interrupted` on a signal."""
        if self.generated is None:
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
        for name, port in self.collectors.items():
            proc = ManagedProcess(f"collector-{name}", cli_argv("collect", name, "--config", cfg),
                                  log_path=logs / f"collector-{name}.log", start_timeout=60.0, stop_timeout=40.0)
            batch.append(Component(f"collector-{name}", proc, _health(f"http://127.0.0.1:{port}/healthz"),
                                   f":{port}"))
        self._start(*batch)
        tap = ManagedProcess("tap", cli_argv("serve", "--config", cfg), log_path=logs / "tap.log",
                             start_timeout=60.0, stop_timeout=30.0)
        self._start(Component("tap", tap, _health(f"http://127.0.0.1:{p.tap}/readyz"), f":{p.tap} admin :{p.admin}"))

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
            "tap metrics": f"http://127.0.0.1:{p.tap_metrics}/metrics",
            "kafka": f"127.0.0.1:{p.kafka}",
            "elasticsearch": f"http://127.0.0.1:{p.es}",
            "mock LLM": f"http://127.0.0.1:{p.mock}/v1",
            "admin API": f"http://127.0.0.1:{p.admin}  (token: {(self.state_dir / 'admin-token').resolve()})",
            "collector metrics": ", ".join(f"{n} :{port}" for n, port in self.collectors.items()),
            "files": str((self.state_dir / "events").resolve()),
            "lake (Parquet)": str((self.state_dir / "lake").resolve()),
            "budget store": str((self.state_dir / "budgets.sqlite3").resolve()),
            "logs": str(self.logs.resolve()),
            "config": str(self.config_path) if self.config_path else "",
        }


def _health(url: str) -> Callable[[], bool]:
    return lambda: http_ok(url)
