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
import yaml

from gateway_tap.dev.panel import parse_metrics
from gateway_tap.examples import DEMO_CONFIG
from tests.support.up import ROOT, Up, free_ports, wait_for

TIMEOUT_S = 60.0


def quickstart_blocks() -> list[tuple[str, str]]:
    """The fenced (language, code) blocks of the README's Quickstart section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def test_the_readme_quickstart_runs_as_written(make_up: type[Up], tmp_path: Path) -> None:
    """Every command and SDK example of the README's Quickstart, run as a user would from a second terminal
    (gateway-tap on PATH, in the directory holding .gateway-tap/), only with this test's ports; the SDK
    examples under ``-W error``, so a deprecated demo model fails them."""
    from gateway_tap.dev.stack import BUILTIN_COLLECTORS, Ports

    up = make_up(tmp_path / "state", free_ports()).start()
    defaults = Ports()
    ours = {f"127.0.0.1:{getattr(defaults, name)}": up.ports[option] for name, option in Ports.OPTIONS.items()}
    ours |= {f"127.0.0.1:{c.metrics_port}": up.ports[c.option] for c in BUILTIN_COLLECTORS.values()}
    user = tmp_path / "user"  # the repo as the user sees it: .gateway-tap/ in the working directory
    user.mkdir()
    (user / ".gateway-tap").symlink_to(up.state_dir)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # activate

    def run(language: str, code: str) -> str:
        for default, port in ours.items():
            code = code.replace(default, f"127.0.0.1:{port}")
        if language == "bash":
            code = "\n".join(line for line in code.splitlines() if not line.startswith("tail -f"))
            argv = ["bash", "-euo", "pipefail", "-c", code]
        else:
            argv = [sys.executable, "-W", "error", "-c", code]
        result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=user, timeout=120)
        assert result.returncode == 0, f"{language} block failed ({result.returncode}):\n{code}\n{result.stderr}"
        return result.stdout

    blocks = quickstart_blocks()
    assert [lang for lang, _ in blocks].count("python") == 2, blocks  # the OpenAI and the Anthropic SDK
    ran = []
    for language, code in blocks:
        if code.startswith(("make run", "source .venv/bin/activate")):
            assert language == "bash"  # started above / PATH set in env
            continue
        if "GATEWAY_TAP_ADMIN_URL" in code:  # onboarding: the key is printed once; the user exports it
            out = run(language, code)
            env["TEAM_KEY"] = re.search(r"key:\s+(gt-\S+)", out).group(1)  # type: ignore[union-attr]
        elif code.startswith("ls .gateway-tap/events"):  # "wait about 5 seconds" before the first search
            wait_for(lambda: '"count":0' not in httpx.get(f"{up.es_url}/gateway-proxy_log/_count").text,
                     TIMEOUT_S, "the first events in Elasticsearch", up)
            out = run(language, code)
            assert '"hits"' in out and "gateway_tap_requests_total" in out and "events_handled" in out, out
        elif "duckdb" in code:  # "a new object every 10 s"
            wait_for(lambda: any((up.state_dir / "lake" / "type=analytics").glob("*/*/*.parquet")), TIMEOUT_S,
                     "the first lake object", up)
            out = run(language, code)
            assert "team-search" in out, out
        else:
            out = run(language, code)
        ran.append(out)
    assert any('"key":"gt-' in out.replace(" ", "") for out in ran), ran  # the curl onboarding
    assert len(ran) == len(blocks) - 2

    # The local admin token: 0600, shown once (on the run that created it), never in logs or the config.
    token_file = up.state_dir / "admin-token"
    token = token_file.read_text().strip()
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert up.output().count(token) == 1
    assert token not in (up.state_dir / "logs" / "up.log").read_text()
    assert token not in (up.state_dir / "gateway-tap.yaml").read_text()
    admin = f"http://127.0.0.1:{up.ports['--admin-port']}"
    assert httpx.get(f"{admin}/v1/apps", timeout=10).status_code == 401
    assert httpx.get(f"{admin}/v1/apps", headers={"authorization": "Bearer gt-admin-wrong"},
                     timeout=10).status_code == 401
    assert httpx.get(f"{up.tap_url}/v1/apps", headers={"authorization": f"Bearer {token}"},
                     timeout=10).status_code in (401, 404)  # never on the proxy's port
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


def test_up_names_a_collector_of_config_that_cannot_start(tmp_path: Path) -> None:
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    doc["collectors"]["broken"] = {"plugin": "no-such-module:Collector"}
    source = tmp_path / "mine.yaml"
    source.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "gateway_tap", "up", "--plain", "--state-dir",
                             str(tmp_path / "state"), "--config", str(source),
                             *[str(x) for kv in free_ports().items() for x in kv]],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "collector-broken exited" in result.stdout and "no-such-module" in result.stdout, result.stdout
    assert "stopping noida-db" in result.stdout
