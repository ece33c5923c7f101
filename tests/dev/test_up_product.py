"""``gateway-tap up`` as the whole product: its admin API, the collectors of ``--config``, reloads of that file.

Each test runs its own ``up`` on free ports with a temp state dir (:mod:`tests.support.up`); clients are
the official SDK and the ``gateway-tap admin`` CLI a user would run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway_tap.dev.panel import parse_metrics
from gateway_tap.examples import DEMO_CONFIG
from tests.support.up import ROOT, Up, free_ports, wait_for

TIMEOUT_S = 60.0


def admin_cli(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    """``gateway-tap admin ARGS`` with the environment up's ready lines tell the user to export."""
    token = (up.state_dir / "admin-token").read_text().strip()
    env = {**os.environ, "GATEWAY_TAP_ADMIN_URL": f"http://127.0.0.1:{up.ports['--admin-port']}",
           "GATEWAY_TAP_ADMIN_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "gateway_tap", "admin", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=ROOT)


def test_up_serves_the_admin_api_with_a_local_token(make_up: type[Up], tmp_path: Path) -> None:
    up = make_up(tmp_path / "state", free_ports()).start()
    token_file = up.state_dir / "admin-token"
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert up.output().count(token) == 1  # shown once, on the run that created it
    assert token not in (up.state_dir / "logs" / "up.log").read_text()
    assert token not in (up.state_dir / "gateway-tap.yaml").read_text()
    admin = f"http://127.0.0.1:{up.ports['--admin-port']}"
    assert f"GATEWAY_TAP_ADMIN_URL={admin}" in up.output()

    created = admin_cli(up, "apps", "create", "team-search", "--name", "Search team", "--llm", "openai")
    assert created.returncode == 0, created.stderr
    issued = admin_cli(up, "keys", "issue", "team-search", "--json")
    assert issued.returncode == 0, issued.stderr
    key = yaml.safe_load(issued.stdout)["key"]
    client = openai.OpenAI(base_url=f"{up.tap_url}/llm/openai/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello!"}])
    assert reply.choices[0].message.content and reply.usage is not None

    apps = httpx.get(f"{admin}/v1/apps", headers={"authorization": f"Bearer {token}"}, timeout=10)
    assert apps.status_code == 200 and "team-search" in {a["id"] for a in apps.json()["data"]}, apps.text
    assert httpx.get(f"{admin}/v1/apps", timeout=10).status_code == 401
    assert httpx.get(f"{admin}/v1/apps", headers={"authorization": "Bearer gt-admin-wrong"},
                     timeout=10).status_code == 401
    # Never on the proxy's port.
    assert httpx.get(f"{up.tap_url}/v1/apps", headers={"authorization": f"Bearer {token}"},
                     timeout=10).status_code in (401, 404)
    up.stop()


def user_config(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The demo config as a user would adapt it: a collector of their own (control counters, fed by the
    request enricher after every request), a budget store up replaces, and no response_modifier yet."""
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    doc["plugins"] = [p for p in doc["plugins"] if p["name"] != "response_modifier"]
    enricher = next(p for p in doc["plugins"] if p["name"] == "request_enricher")
    enricher["config"]["report_every_requests"] = 1
    doc["collectors"]["control-counters"] = {
        "plugin": "gateway_tap.examples.collectors.control_counters:ControlCounters"}
    doc["budget_store"] = {"backend": "postgres", "postgres_dsn_env": "MY_BUDGET_DSN"}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path, doc


def served_by(up: Up) -> str | None:
    resp = httpx.post(f"{up.tap_url}/llm/openai/v1/chat/completions", timeout=30,
                      headers={"authorization": "Bearer gt-demo-key"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text
    return resp.headers.get("x-served-by")


def test_up_runs_the_collectors_of_config_and_reloads_read_that_file(make_up: type[Up], tmp_path: Path) -> None:
    source, doc = user_config(tmp_path)
    up = make_up(tmp_path / "state", free_ports(), extra=["--config", str(source)]).start()
    out = up.output()
    assert "budget_store.backend: 'postgres' -> 'sqlite'" in out  # said at start, not silently replaced

    # The collector declared in --config runs like the built-in ones, on a metrics port up chose.
    counters = up.child("collect control-counters")
    match = re.search(r"control-counters :(\d+)", out)
    assert match, out
    metrics_url = f"http://127.0.0.1:{match.group(1)}/metrics"

    def counted() -> float:
        try:
            text = httpx.get(metrics_url, timeout=5).text
        except httpx.HTTPError:
            return 0.0
        return parse_metrics(text).get("gateway_tap_control_requests_total", 0.0)

    assert served_by(up) is None
    wait_for(lambda: counted() >= 1, TIMEOUT_S, "the request counted by the control-counters collector", up)
    assert counters.is_running()

    # A new plugin in --config: up rewrites the generated config, a SIGHUP of the tap loads it.
    doc["plugins"].append({"name": "response_modifier", "order": 30,
                           "use": "gateway_tap.examples.plugins.response_modifier:ResponseModifier",
                           "config": {"headers": {"x-served-by": "v1"}}})
    doc["tap"]["reload"] = {"watch": True, "interval_s": 0.5}
    source.write_text(yaml.safe_dump(doc, sort_keys=False))
    wait_for(lambda: f"{source} changed:" in up.output(), TIMEOUT_S, "up noticing the change", up)
    up.child("serve --config").send_signal(signal.SIGHUP)
    wait_for(lambda: served_by(up) == "v1", TIMEOUT_S, "the new plugin after SIGHUP", up)

    # With tap.reload.watch now on, saving the file is enough.
    doc["plugins"][-1]["config"]["headers"]["x-served-by"] = "v2"
    source.write_text(yaml.safe_dump(doc, sort_keys=False))
    wait_for(lambda: served_by(up) == "v2", TIMEOUT_S, "the changed plugin config without a signal", up)

    # An invalid file is reported and changes nothing; a new collector needs a restart, and up says so.
    generated = (up.state_dir / "gateway-tap.yaml").read_text()
    source.write_text(source.read_text().replace("report_every_requests: 1", "report_every_requests: -1"))
    wait_for(lambda: "changed but is invalid" in up.output(), TIMEOUT_S, "the invalid file reported", up)
    assert "report_every_requests" in up.output().split("changed but is invalid")[-1]
    assert (up.state_dir / "gateway-tap.yaml").read_text() == generated
    doc["collectors"]["later"] = {"plugin": "gateway_tap.examples.collectors.control_counters:ControlCounters"}
    source.write_text(yaml.safe_dump(doc, sort_keys=False))
    wait_for(lambda: "collector later is new: restart up to run it" in up.output(), TIMEOUT_S,
             "the new collector reported", up)
    assert served_by(up) == "v2"
    up.stop()


@pytest.mark.parametrize("bad", ["no-such-module:Collector"])
def test_up_names_a_collector_of_config_that_cannot_start(make_up: type[Up], tmp_path: Path, bad: str) -> None:
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    doc["collectors"]["broken"] = {"plugin": bad}
    source = tmp_path / "mine.yaml"
    source.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "gateway_tap", "up", "--plain", "--state-dir",
                             str(tmp_path / "state"), "--config", str(source),
                             *[str(x) for kv in free_ports().items() for x in kv]],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collector-broken exited" in result.stdout and "no-such-module" in result.stdout, result.stdout
    assert "stopping noida-db" in result.stdout
