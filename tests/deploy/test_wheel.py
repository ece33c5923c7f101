"""The built wheel in a clean venv outside the repo, as a new user meets it.

``pip install 'gateway-tap[local]'`` from the wheel built from this tree, then, with nothing of the repo in
sight (working directory in a temp dir, no ``PYTHONPATH``): ``gateway-tap up`` with the packaged demo config
comes up healthy, serves a request through the example plugins into the sinks and stops cleanly; ``serve`` and
``collect`` run on their own against the test broker; ``new-plugin`` / ``new-collector`` scaffold packages that
install and pass their own tests.

Offline after the first run: dependencies are installed with ``--no-index`` from a wheelhouse in pytest's cache,
filled from the package index only when an offline install finds something missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
import yaml

from gateway_tap.dev.servers import free_port, http_ok
from tests.support.collectors import create_topics
from tests.support.up import free_ports

ROOT = Path(__file__).resolve().parents[2]
# What goes into the wheel (the Dockerfile copies the same).
SOURCES = ("pyproject.toml", "README.md", "gateway_tap", "collectors", "schemas")
# Installed next to the wheel so the scaffolded packages build (no build isolation) and run their tests.
TOOLS = ("setuptools>=77,<81", "pytest>=8,<9", "pytest-asyncio>=0.24,<1.2")
DEMO_KEY = "gt-demo-key"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello from the wheel"}]}

pytestmark = [pytest.mark.wheel, pytest.mark.integration]


def run(argv: list[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class CleanVenv:
    """A venv in a temp dir outside the repo holding the wheel, and a working directory next to it."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    @property
    def gateway_tap(self) -> Path:
        return self.root / "venv" / "bin" / "gateway-tap"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = os.pathsep.join([str(self.python.parent), env.get("PATH", "")])
        return env

    def run(self, *argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run(list(argv), cwd=cwd or self.work, env=self.env(), timeout=timeout)


def pip_install(venv: CleanVenv, wheelhouse: Path, *requirements: str) -> None:
    """Install offline from ``wheelhouse``; fill it from the index once when something is missing."""
    install = [venv.python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse,
               "--no-build-isolation", *requirements]
    done = venv.run(*install)
    if done.returncode != 0:
        fill = run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", wheelhouse, "--find-links", wheelhouse,
                    *requirements])
        assert fill.returncode == 0, fill.stdout + fill.stderr
        for ours in wheelhouse.glob("gateway_tap-*.whl"):  # the wheel under test is always the fresh one
            ours.unlink()
        done = venv.run(*install)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> CleanVenv:
    root = tmp_path_factory.mktemp("wheel")
    assert not root.is_relative_to(ROOT)
    source = root / "src"
    source.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing (build/, *.egg-info) in the repo
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, source / name)
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir",
                 root / "dist", source])
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (root / "dist").glob("gateway_tap-*.whl")

    clean = CleanVenv(root)
    clean.work.mkdir()
    made = run([sys.executable, "-m", "venv", root / "venv"])
    assert made.returncode == 0, made.stderr
    wheelhouse = pytestconfig.cache.mkdir("wheelhouse")
    pip_install(clean, wheelhouse, f"{wheel}[local]", *TOOLS)
    return clean


def test_the_wheel_installs_its_package_data_and_metadata(venv: CleanVenv) -> None:
    probe = venv.run("python", "-c", "import json, importlib.metadata as m, gateway_tap, gateway_tap.examples as e; "
                     "print(json.dumps([gateway_tap.__file__, str(e.DEMO_CONFIG), e.DEMO_CONFIG.is_file(), "
                     "m.metadata('gateway-tap')['License-Expression']]))")
    assert probe.returncode == 0, probe.stderr
    module, demo_config, exists, license_expression = orjson.loads(probe.stdout)
    site = venv.root / "venv" / "lib"
    assert Path(module).is_relative_to(site) and Path(demo_config).is_relative_to(site)
    assert exists is True
    assert license_expression == "Apache-2.0"
    assert venv.run("gateway-tap", "--version").stdout.strip() == "gateway-tap, version 0.1.0"


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@contextlib.contextmanager
def started(venv: CleanVenv, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``gateway-tap ARGS`` from the clean venv in its own session; SIGKILLed with its descendants if left running."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv.gateway_tap), *args], cwd=venv.work, env=venv.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                seen.update((c.pid, c) for c in psutil.Process(proc.pid).children(recursive=True))
            proc.kill()
            proc.wait()
        for child in seen.values():
            if running(child):
                with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)


def wait_for(check: object, timeout_s: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        output = log.read_text(errors="replace")
        assert proc.poll() is None, f"exited with {proc.returncode} while waiting for {what}:\n{output[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout_s}s:\n{output[-4000:]}"
        time.sleep(0.2)


def lines_with(directory: Path, needle: str) -> int:
    """JSON Lines written so far under ``directory`` that mention ``needle``."""
    return sum(needle in line for path in directory.rglob("*.jsonl")
               for line in path.read_text(errors="replace").splitlines())


def test_up_from_the_wheel_comes_up_healthy_serves_and_stops_cleanly(venv: CleanVenv) -> None:
    ports = free_ports()  # every port option of up, so no default port is touched
    state, log = venv.root / "up-state", venv.root / "up.log"
    port_args = [str(x) for kv in ports.items() for x in kv]
    # No --config, and no examples/ in the working directory: the demo config shipped in the wheel.
    with started(venv, "up", "--plain", "--state-dir", str(state), *port_args, log=log) as up:
        wait_for(lambda: "ready; press Ctrl-C" in log.read_text(errors="replace"), 120, "ready", up, log)
        children = psutil.Process(up.pid).children(recursive=True)
        commands = [c.cmdline() for c in children]
        ours = [c for c in commands if "gateway_tap" in c]
        expected = {("serve", "--config"), ("collect", "file"), ("collect", "elasticsearch"), ("collect", "budget"),
                    ("mock-llm", "--port")}
        missing = expected - {tuple(c[3:5]) for c in ours}
        logs = {name: (state / "logs" / f"collector-{name}.log").read_text(errors="replace")[-3000:]
                for _, name in missing if (state / "logs" / f"collector-{name}.log").exists()}
        assert not missing, f"not running: {sorted(missing)}\n{commands}\n{logs}\n{log.read_text()[-2000:]}"
        assert all(c[0] == str(venv.python) for c in ours), commands  # the wheel's interpreter, not the repo's
        assert any("noida" in part for c in commands for part in c), commands

        tap = f"http://127.0.0.1:{ports['--tap-port']}"
        health = {"tap": f"{tap}/readyz", "mock-llm": f"http://127.0.0.1:{ports['--mock-port']}/healthz",
                  "elasticsearch": f"http://127.0.0.1:{ports['--es-port']}/"}
        for option in ("--file-metrics-port", "--es-metrics-port", "--budget-metrics-port"):
            health[option] = f"http://127.0.0.1:{ports[option]}/healthz"
        assert {name: http_ok(url, timeout=5) for name, url in health.items()} == dict.fromkeys(health, True)

        reply = httpx.post(f"{tap}/llm/openai/v1/chat/completions", json=CHAT, timeout=30,
                           headers={"authorization": f"Bearer {DEMO_KEY}"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-served-by"] == "gateway-tap"  # the packaged response_modifier plugin
        request_id = reply.headers["x-request-id"]
        wait_for(lambda: lines_with(state / "events" / "proxy_log", request_id) == 1, 60,
                 "the request's proxy_log in the file sink", up, log)

        descendants = [c for c in children if running(c)]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0, log.read_text(errors="replace")
    output = log.read_text(errors="replace")
    assert output.rstrip().endswith("stopped"), output[-2000:]
    assert not [p.pid for p in descendants if running(p)], output[-2000:]
    assert not (state / "up.pids").exists()


def test_serve_and_collect_from_the_wheel(venv: CleanVenv, kafka_bootstrap: str, topic_prefix: str,
                                          mock_llm: str) -> None:
    asyncio.run(create_topics(kafka_bootstrap, topic_prefix))
    locate = venv.run("python", "-c", "from gateway_tap.examples import DEMO_CONFIG; print(DEMO_CONFIG)")
    document = yaml.safe_load(Path(locate.stdout.strip()).read_text())
    tap_port, metrics_port = free_port(), free_port()
    document["kafka"] = {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix}
    document["tap"]["listen"] = {"host": "127.0.0.1", "port": tap_port}
    document["tap"]["metrics"] = {"host": "127.0.0.1", "port": free_port()}
    document["tap"]["publisher"]["spool_dir"] = str(venv.root / "serve-spool")
    for llm in document["llms"]:
        llm["upstream_url"] = mock_llm
    document["budget_store"]["sqlite_path"] = str(venv.root / "serve-budgets.sqlite3")
    events = venv.root / "serve-events"
    document["collectors"]["file"].update({"metrics": {"host": "127.0.0.1", "port": metrics_port},
                                           "batch": {"max_wait_ms": 50}, "config": {"directory": str(events)}})
    config = venv.work / "gateway-tap.yaml"
    config.write_text(yaml.safe_dump(document))
    checked = venv.run("gateway-tap", "check-config", str(config))
    assert checked.returncode == 0, checked.stderr

    collect_log, serve_log = venv.root / "collect.log", venv.root / "serve.log"
    with started(venv, "collect", "file", "--config", str(config), log=collect_log) as collect, \
            started(venv, "serve", "--config", str(config), log=serve_log) as serve:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{metrics_port}/healthz"), 60, "collector health", collect,
                 collect_log)
        wait_for(lambda: http_ok(f"http://127.0.0.1:{tap_port}/readyz"), 60, "tap ready", serve, serve_log)
        reply = httpx.post(f"http://127.0.0.1:{tap_port}/llm/openai/v1/chat/completions", json=CHAT, timeout=30,
                           headers={"authorization": f"Bearer {DEMO_KEY}"})
        assert reply.status_code == 200, reply.text
        request_id = reply.headers["x-request-id"]
        wait_for(lambda: lines_with(events / "analytics", request_id) == 1, 60, "the exported analytics event",
                 collect, collect_log)
        for proc in (serve, collect):
            proc.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0, serve_log.read_text(errors="replace")
        assert collect.wait(timeout=60) == 0, collect_log.read_text(errors="replace")


def test_scaffolded_plugin_and_collector_install_and_pass_their_tests(venv: CleanVenv) -> None:
    for command, name in (("new-plugin", "wheel-stamp"), ("new-collector", "wheel-ledger")):
        made = venv.run("gateway-tap", command, name)
        assert made.returncode == 0, made.stderr
        package = venv.work / name
        installed = venv.run("python", "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
                             f"{package}[test]")
        assert installed.returncode == 0, installed.stdout + installed.stderr
        tested = venv.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=package)
        assert tested.returncode == 0, tested.stdout + tested.stderr
        assert " passed" in tested.stdout and "failed" not in tested.stdout
