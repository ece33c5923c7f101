"""``gateway-tap new-collector`` / ``new-plugin``: the scaffolded packages install, pass their own tests,
and run for real: the collector under ``gateway-tap collect`` against the broker, the plugin in
``gateway-tap serve`` in front of the mock upstream.

The packages are built and installed with pip into a temp ``--target`` directory that only the
child processes see (``PYTHONPATH``), so nothing is left in the project's environment.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway_tap.dev.servers import ManagedProcess, cli_argv, free_port, http_ok
from gateway_tap.scaffold import ScaffoldError, names_for, template_files
from schemas import Analytics, encode_event, message_headers, topic_for
from tests.support.collectors import read_topic, wait_for
from tests.support.tap import APP_KEY, UPSTREAM_SECRET, tap_config

ROOT = Path(__file__).resolve().parent.parent
COLLECTOR, PLUGIN = "ledger-demo", "stamp-demo"


@dataclass
class Scaffolded:
    collector: Path
    plugin: Path
    site: Path  # pip --target directory holding both installed packages

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": os.pathsep.join(p for p in (str(self.site), os.environ.get("PYTHONPATH")) if p)}


def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def scaffolded(tmp_path_factory: pytest.TempPathFactory) -> Scaffolded:
    """One collector and one plugin made with the CLI, built and installed (not editable) into a temp dir."""
    base = tmp_path_factory.mktemp("scaffold")
    for command, name in (("new-collector", COLLECTOR), ("new-plugin", PLUGIN)):
        done = run(*cli_argv(command, name, "--dir", str(base)))
        assert done.returncode == 0, done.stderr
        assert f"created {command.removeprefix('new-')} package {name}" in done.stdout
    site = base / "site"
    done = run(sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(site), str(base / COLLECTOR), str(base / PLUGIN))
    assert done.returncode == 0, done.stdout + done.stderr
    return Scaffolded(base / COLLECTOR, base / PLUGIN, site)


# --- names and files -------------------------------------------------------------------------------------------

def test_names_derive_from_name_with_dashes() -> None:
    names = names_for("collector", "audit-log")
    assert (names.name, names.package, names.dist, names.cls) == ("audit_log", "audit_log", "audit-log",
                                                                  "AuditLogCollector")
    assert names_for("plugin", "model_guard_plugin").cls == "ModelGuardPlugin"


@pytest.mark.parametrize(("kind", "name", "why"), [
    ("plugin", "9lives", "invalid name '9lives': use lower-case letters"),
    ("plugin", "my plugin", "invalid name 'my plugin'"),
    ("collector", "Audit", "invalid name 'Audit'"),
    ("collector", "class", "invalid name 'class'"),
    ("plugin", "json", "would shadow an existing module"),
    ("collector", "collectors", "would shadow an existing module"),
    ("collector", "file", "'file' is a built-in collector"),
])
def test_invalid_names_are_refused_with_a_reason(kind: Any, name: str, why: str) -> None:
    with pytest.raises(ScaffoldError, match=re.escape(why)):
        names_for(kind, name)


def test_cli_refuses_invalid_names_and_existing_directories(tmp_path: Path) -> None:
    bad = run(*cli_argv("new-plugin", "no.dots", "--dir", str(tmp_path)))
    assert bad.returncode == 1
    assert "Error: invalid name 'no.dots'" in bad.stderr
    assert list(tmp_path.iterdir()) == []
    mine = tmp_path / "audit-log"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    again = run(*cli_argv("new-collector", "audit-log", "--dir", str(tmp_path)))
    assert again.returncode == 1
    assert f"{mine} already exists" in again.stderr
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_scaffold_writes_every_template_with_no_marker_left(scaffolded: Scaffolded) -> None:
    for kind, root in (("collector", scaffolded.collector), ("plugin", scaffolded.plugin)):
        written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
                         and "build" not in p.parts and ".egg-info" not in str(p))
        package = names_for(kind, root.name).package  # type: ignore[arg-type]
        expected = sorted("/".join(package if part == "__package__" else part for part in parts)
                          for parts, _ in template_files(kind))  # type: ignore[arg-type]
        assert written == expected
        for path in root.rglob("*"):
            if path.is_file() and "build" not in path.parts:
                assert not re.search(r"__(NAME|PACKAGE|DIST|CLASS|TITLE|GATEWAY_TAP_VERSION)__", path.read_text())
    entry_points = "".join(p.read_text() for p in sorted(scaffolded.site.glob("*.dist-info/entry_points.txt")))
    assert "[gateway_tap.collectors]\nledger_demo = ledger_demo.collector:LedgerDemoCollector\n" in entry_points
    assert "[gateway_tap.plugins]\nstamp_demo = stamp_demo.plugin:StampDemoPlugin\n" in entry_points


def test_templates_ship_in_the_gateway_tap_wheel(tmp_path: Path) -> None:
    """Build gateway-tap's wheel (from a copy of the sources) and find every template file in it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gateway_tap", src / "gateway_tap", ignore=shutil.ignore_patterns("__pycache__"))
    done = run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--wheel-dir", str(tmp_path / "dist"), str(src))
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("gateway_tap-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("gateway_tap/templates/")}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "gateway_tap" / "templates").rglob("*.tmpl")}
    assert len(on_disk) >= 10
    assert shipped == on_disk


# --- the scaffolds' own tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["collector", "plugin"])
def test_scaffolded_package_passes_its_own_tests(scaffolded: Scaffolded, kind: str) -> None:
    root = scaffolded.collector if kind == "collector" else scaffolded.plugin
    done = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=root, env=scaffolded.env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"\b{4 if kind == 'collector' else 5} passed\b", done.stdout), done.stdout


# --- for real ----------------------------------------------------------------------------------------------------

def analytics(n: int, start: int = 0, currency: str = "USD") -> list[Analytics]:
    return [Analytics(gateway_id="g", request_id=f"r{i}", app_id="demo", llm_id="openai", vendor="openai",
                      model="gpt-4o-mini", total_tokens=i, cost=i / 1000, currency=currency, latency_ms=3.0,
                      status_code=200) for i in range(start, start + n)]


async def test_scaffolded_collector_runs_under_gateway_tap_collect(
        scaffolded: Scaffolded, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    topic = topic_for("analytics", topic_prefix)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1), NewTopic(topic + ".dlq", 1, 1)])
    finally:
        await admin.close()
    usd, eur = analytics(8), analytics(1, start=100, currency="EUR")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:  # the first three twice: a redelivered event must not add a row
        for event in [*usd[:5], *eur, *usd[5:], *usd[:3]]:
            await producer.send_and_wait(topic, encode_event(event), key=b"demo", headers=message_headers(event))
    finally:
        await producer.stop()

    name, db, port = "ledger_demo", tmp_path / "ledger.sqlite3", free_port()
    config = tmp_path / "gateway-tap.yaml"
    config.write_text(yaml.safe_dump({
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
        "collectors": {name: {"metrics": {"port": port}, "batch": {"max_wait_ms": 20},
                              "config": {"path": str(db)}}}}))

    def ledger_ids() -> list[str]:
        if not db.exists():
            return []
        with sqlite3.connect(db) as conn:
            return [row[0] for row in conn.execute("SELECT id FROM ledger ORDER BY id")]

    proc = ManagedProcess("collect-scaffold", cli_argv("collect", name, "--config", str(config)),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), env=scaffolded.env(),
                          log_path=tmp_path / "collect.log", stop_signal=signal.SIGTERM)
    await _start(proc)
    try:
        dead = await read_topic(kafka_bootstrap, topic + ".dlq", 1)
        await wait_for(lambda: len(ledger_ids()) == len(usd), "every USD event in the ledger")
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            metrics = await resp.text()
    finally:
        code = await _stop(proc)
    assert code == 0, proc.log_tail()
    assert ledger_ids() == sorted(e.id for e in usd)
    assert dict(dead[0].headers)["error"] == b"cost in EUR, this ledger keeps USD"
    written = float(re.search(r"^ledger_demo_rows_written_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert written >= len(usd)


async def test_scaffolded_plugin_runs_in_gateway_tap_serve(
        scaffolded: Scaffolded, mock_llm: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    plugin = {"name": "stamp_demo", "use": "stamp_demo",  # the installed entry point
              "config": {"header": "x-stamped", "value": "yes", "blocked_models": ["gpt-4o"]}}
    document = tap_config(mock_llm, kafka_bootstrap, topic_prefix, tmp_path / "spool", port=port, plugins=[plugin],
                          tap={"access_log": False})
    config = tmp_path / "tap.yaml"
    config.write_text(yaml.safe_dump(document))
    checked = run(*cli_argv("check-config", str(config)), env=scaffolded.env())
    assert checked.returncode == 0, checked.stderr
    proc = ManagedProcess("tap-scaffold", cli_argv("serve", "--config", str(config), "--workers", "1"),
                          ready=lambda: http_ok(f"http://127.0.0.1:{port}/readyz"),
                          env={**scaffolded.env(), "TAP_TEST_UPSTREAM_KEY": UPSTREAM_SECRET},
                          log_path=tmp_path / "tap.log", start_timeout=60, stop_signal=signal.SIGTERM)
    await _start(proc)
    url = f"http://127.0.0.1:{port}/llm/openai/v1/chat/completions"
    auth = {"authorization": f"Bearer {APP_KEY}"}
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=body, headers=auth) as resp:
                ok_status, ok_headers = resp.status, resp.headers.copy()
                await resp.read()
            async with http.post(url, json={**body, "model": "gpt-4o"}, headers=auth) as resp:
                blocked_status, blocked = resp.status, await resp.json()
    finally:
        code = await _stop(proc)
    assert (ok_status, ok_headers.get("x-stamped")) == (200, "yes")
    assert blocked_status == 403
    assert blocked["error"]["code"] == "model_blocked"
    assert code == 0, proc.log_tail()


async def _start(proc: ManagedProcess) -> None:
    await asyncio.to_thread(proc.start)


async def _stop(proc: ManagedProcess) -> int | None:
    return await asyncio.to_thread(proc.stop)
