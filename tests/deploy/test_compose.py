"""The production-shaped deployment: docker-compose.yml, Dockerfile, Prometheus and Grafana files.

No Docker engine runs here: ``docker-compose config`` (Debian's docker-compose) validates and
resolves the compose file, ``promtool`` checks the Prometheus config, the alert rules and
their unit tests, and the rest is cross-checked against the code (CLI, config, topics).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_tap.settings import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
APP_CONFIG = ROOT / "deploy" / "gateway-tap.compose.yaml"
PROMETHEUS_DIR = ROOT / "dashboards" / "prometheus"
GRAFANA_PROVISIONING = ROOT / "dashboards" / "grafana" / "provisioning"
CONTAINER_CONFIG = "/etc/gateway-tap/gateway-tap.yaml"
COLLECTORS = ("file", "elasticsearch", "budget", "otlp")
OTEL_PROFILE = {"otel-collector", "collector-otlp"}  # optional: docker-compose --profile otel
NO_PROBE = {"otel-collector"}  # the image has no shell or probe binary to run a healthcheck with
ONE_SHOT_JOBS = {"kafka-init", "elasticsearch-init"}

docker_compose = shutil.which("docker-compose")
promtool = shutil.which("promtool")
needs_compose = pytest.mark.skipif(docker_compose is None,
                                   reason="docker-compose not installed (make test installs the Debian package)")
needs_promtool = pytest.mark.skipif(promtool is None,
                                    reason="promtool not installed (make test installs Debian's prometheus)")


def run_compose(*args: str, env_file: Path = ENV_EXAMPLE, env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    assert docker_compose is not None
    return subprocess.run([docker_compose, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


def required_variables() -> set[str]:
    """Variables the compose file interpolates as ``${NAME:?...}`` (mandatory)."""
    return set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """``docker-compose --profile demo config`` output: the fully resolved stack."""
    if docker_compose is None:
        pytest.skip("docker-compose not installed (make test installs the Debian package)")
    result = run_compose("--profile", "demo", "config")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = yaml.safe_load(result.stdout)
    return data


@pytest.fixture(scope="module")
def services(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(resolved["services"])


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return data


# ---------------------------------------------------------------- compose itself

@needs_compose
@pytest.mark.parametrize("profile", [[], ["--profile", "demo"], ["--profile", "otel"]], ids=["default", "demo", "otel"])
def test_compose_config_validates(profile: list[str]) -> None:
    result = run_compose(*profile, "config", "--quiet")
    assert result.returncode == 0, result.stderr


@needs_compose
def test_demo_profile_adds_only_the_mock_llm() -> None:
    default = set(run_compose("config", "--services").stdout.split())
    demo = set(run_compose("--profile", "demo", "config", "--services").stdout.split())
    # docker-compose 1.x lists profiled services either way; the resolved file must mark it.
    assert demo - default <= {"mock-llm"}
    assert "mock-llm" in demo


def test_mock_llm_only_runs_in_the_demo_profile(services: dict[str, dict[str, Any]]) -> None:
    assert services["mock-llm"].get("profiles") == ["demo"]
    assert all(services[name].get("profiles") == ["otel"] for name in OTEL_PROFILE)
    assert all(not s.get("profiles") for name, s in services.items() if name not in {"mock-llm", *OTEL_PROFILE})


@needs_compose
def test_missing_secret_is_an_error_naming_it(tmp_path: Path) -> None:
    """Every password is mandatory: without .env values compose refuses to render the stack."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in required_variables()}
    result = run_compose("config", "--quiet", env_file=empty, env=env)
    assert result.returncode != 0
    assert any(name in result.stderr for name in required_variables()), result.stderr


def test_env_example_sets_every_required_variable() -> None:
    example = {line.split("=", 1)[0] for line in ENV_EXAMPLE.read_text().splitlines()
               if "=" in line and not line.lstrip().startswith("#")}
    required = required_variables()
    assert {"ELASTIC_PASSWORD", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"} <= required
    assert required <= example, f"missing from .env.example: {sorted(required - example)}"


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name}: no image (a build also needs a tagged image name)"
        if "@sha256:" in image:
            continue
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag and repo, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: image {image!r} is not pinned to a version"


def test_expected_services(services: dict[str, dict[str, Any]]) -> None:
    expected = {"kafka", "kafka-init", "elasticsearch", "elasticsearch-init", "postgres", "prometheus", "grafana",
                "tap", "gateway", "mock-llm", *(f"collector-{name}" for name in COLLECTORS)}
    assert expected <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:3.9")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert services["elasticsearch"]["image"].split(":")[-1].startswith("8.")
    assert services["elasticsearch"]["environment"]["xpack.security.enabled"] == "true"
    assert services["postgres"]["image"].split(":")[-1].startswith("16")


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT_JOBS:
            assert service.get("restart") == "no", f"{name}: a one-shot job must not restart"
            continue
        if name in NO_PROBE:
            assert not any(name in (s.get("depends_on") or {}) for s in services.values()), f"{name} is waited for"
            assert service.get("restart") == "unless-stopped", f"{name}: restart policy"
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") == "unless-stopped", f"{name}: restart policy"


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            expected = "service_completed_successfully" if dep in ONE_SHOT_JOBS else "service_healthy"
            assert spec.get("condition") == expected, f"{name} -> {dep}: {spec}"
            assert services[dep].get("healthcheck") or dep in ONE_SHOT_JOBS
    assert "kafka-init" in services["tap"]["depends_on"]
    for name in COLLECTORS:
        assert "kafka-init" in services[f"collector-{name}"]["depends_on"]


def test_tap_runs_two_replicas_behind_one_port(services: dict[str, dict[str, Any]]) -> None:
    tap, gateway = services["tap"], services["gateway"]
    assert tap["deploy"]["replicas"] == 2
    assert not tap.get("ports"), "replicas cannot share a published port: the gateway service publishes it"
    assert gateway.get("ports")
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    listen_port = load_config(APP_CONFIG).tap.listen.port
    assert re.search(rf"server\s+tap:{listen_port}\s+resolve;", nginx)


def test_collectors_are_scalable(services: dict[str, dict[str, Any]]) -> None:
    """``--scale`` needs: no container_name, no published port, no fixed static-membership id."""
    config = load_config(APP_CONFIG)
    for name in COLLECTORS:
        service = services[f"collector-{name}"]
        assert "container_name" not in service and not service.get("ports")
        assert service["command"] == ["collect", name, "--config", CONTAINER_CONFIG]
        assert config.collectors[name].group_instance_id is None, (
            f"collectors.{name}.group_instance_id would be shared by every scaled member")
        assert "file_prefix" not in config.collectors[name].config
    # Scaled file collectors share one volume: each member names its segments after its own
    # static membership id, derived from the container's unique hostname.
    entrypoint = " ".join(services["collector-file"]["entrypoint"])
    assert re.search(r'--group-instance-id "file-\$\$HOSTNAME"', entrypoint), entrypoint


def test_bind_mounts_exist_and_app_config_is_mounted(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":")[0]
            if source.startswith("/") and source.startswith(str(ROOT)):
                assert Path(source).exists(), f"{name}: bind mount {source} does not exist"
        if service.get("image", "").startswith("gateway-tap:") and name != "mock-llm":
            assert f"{APP_CONFIG}:{CONTAINER_CONFIG}:ro" in service["volumes"], name


def test_app_services_match_the_cli(services: dict[str, dict[str, Any]]) -> None:
    """Every command the compose file runs exists in the CLI with the options it passes."""
    from gateway_tap.cli import main

    for name, service in services.items():
        if not service.get("image", "").startswith("gateway-tap:"):
            continue
        argv = service["command"]
        command = main.commands.get(argv[0])
        assert command is not None, f"{name}: gateway-tap has no {argv[0]!r} command"
        known = {opt for param in command.params for opt in getattr(param, "opts", [])}
        # A shell entrypoint may append options to the command (see collector-file).
        appended = re.findall(r"(--[a-z-]+)", " ".join(service.get("entrypoint") or []))
        for arg in [*argv[1:], *appended]:
            if arg.startswith("--"):
                assert arg in known, f"{name}: gateway-tap {argv[0]} has no option {arg}"


# ------------------------------------------------------------ app configuration

def test_app_config_is_valid_and_matches_the_stack() -> None:
    from collectors.config import validate_collector_config
    from collectors.registry import resolve_collector
    from schemas.topics import CONTROL_SUFFIX, TOPIC_SUFFIXES

    config = load_config(APP_CONFIG)
    assert config.kafka.bootstrap_servers == "kafka:9092"
    assert config.tap.listen.host == "0.0.0.0"
    assert config.budget_store.backend == "postgres"
    assert set(config.collectors) == set(COLLECTORS)
    for name, settings in config.collectors.items():
        assert settings.metrics.host == "0.0.0.0" and settings.metrics.port == 9465, name
        validate_collector_config(name, resolve_collector(settings.plugin or name), settings.config)
    # kafka-init creates exactly the event and control topics of schemas.topics (plus their .dlq) under the
    # config's prefix.
    script = (ROOT / "deploy" / "kafka-init.sh").read_text()
    loop = re.search(r"for stream in ([a-z_ ]+); do", script)
    assert loop and set(loop.group(1).split()) == {*TOPIC_SUFFIXES.values(), CONTROL_SUFFIX}
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    assert compose["services"]["kafka-init"]["environment"]["TOPIC_PREFIX"] == config.kafka.topic_prefix


def test_app_config_holds_no_secrets() -> None:
    text = APP_CONFIG.read_text()
    assert not re.search(r"(?i)(password|api_key|secret)\s*:", text)
    assert "postgres_dsn:" not in text  # the DSN (with its password) comes from postgres_dsn_env


def test_deploy_scripts_parse() -> None:
    for script in (ROOT / "deploy").glob("*.sh"):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


# ------------------------------------------------------------------- Dockerfile

def test_dockerfile_is_slim_pinned_non_root_with_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK\s", text, re.M)
    assert re.search(r'^ENTRYPOINT \["gateway-tap"\]$', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"Dockerfile copies missing {path}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and ".env" in ignored


# ------------------------------------------------------------------ Prometheus

def scrape_targets(prometheus_config: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(job, host, port) of every static target and DNS-discovered name."""
    targets = []
    for job in prometheus_config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.append((job["job_name"], host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets.extend((job["job_name"], name, int(dns["port"])) for name in dns["names"])
    return targets


def test_every_scrape_target_is_a_compose_service(prometheus_config: dict[str, Any],
                                                  services: dict[str, dict[str, Any]]) -> None:
    targets = scrape_targets(prometheus_config)
    assert {"tap", "collector"} <= {job for job, _, _ in targets}
    config = load_config(APP_CONFIG)
    for job, host, port in targets:
        assert host in services, f"job {job}: {host} is not a compose service"
        if host == "tap":  # its metrics listener, never the proxy's port
            assert port == config.tap.metrics.port != config.tap.listen.port
            assert str(port) in services["tap"]["expose"]
        elif host.startswith("collector-"):
            assert port == config.collectors[host.removeprefix("collector-")].metrics.port
    assert {host for _, host, _ in targets} >= {f"collector-{name}" for name in COLLECTORS}


@needs_promtool
def test_promtool_check_config() -> None:
    result = subprocess.run([str(promtool), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    result = subprocess.run([str(promtool), "check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_fire_on_their_series() -> None:
    """promtool's rule unit tests: each alert fires on its condition and stays quiet on a look-alike."""
    result = subprocess.run([str(promtool), "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_planned_alerts() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    exprs = {r["alert"]: r["expr"] for group in rules["groups"] for r in group["rules"]}
    for metric in ("gateway_tap_collector_consumer_lag", "gateway_tap_collector_events_dead_lettered_total",
                   "gateway_tap_publisher_spool_bytes", 'gateway_tap_requests_total{status_class="5xx"}',
                   "gateway_tap_budget_used_ratio"):
        assert any(metric in expr for expr in exprs.values()), f"no alert on {metric}"
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts.test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == set(exprs), f"alerts without a unit test: {sorted(set(exprs) - tested)}"


# --------------------------------------------------------------------- Grafana

def test_grafana_datasources_point_at_compose_services(services: dict[str, dict[str, Any]]) -> None:
    data = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "datasources.yml").read_text())
    by_uid = {ds["uid"]: ds for ds in data["datasources"]}
    assert set(by_uid) == {"prometheus", "elasticsearch"}
    for ds in by_uid.values():
        host = re.match(r"https?://([^:/]+)", ds["url"])
        assert host and host.group(1) in services, ds["url"]
    es = by_uid["elasticsearch"]
    # The password is expanded from the container's environment, never written here.
    password = es["secureJsonData"]["basicAuthPassword"]
    assert password.startswith("$") and password[1:] in services["grafana"]["environment"]
    assert es["jsonData"]["timeField"] == "emitted_at"


def test_grafana_dashboard_provider_reads_the_mounted_json(services: dict[str, dict[str, Any]]) -> None:
    data = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "dashboards.yml").read_text())
    paths = {p["options"]["path"] for p in data["providers"]}
    assert paths == {"/var/lib/grafana/dashboards"}
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in services["grafana"]["volumes"]}
    assert mounts["/var/lib/grafana/dashboards"] == str(ROOT / "dashboards" / "grafana" / "json")
    assert mounts["/etc/grafana/provisioning"] == str(GRAFANA_PROVISIONING)
