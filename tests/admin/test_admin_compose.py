"""The compose stack's admin API: published on the host's loopback only, its token from .env, proxied to the
tap replicas' admin listeners."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from gateway_tap.settings import load_config
from tests.deploy.test_compose import APP_CONFIG, ENV_EXAMPLE, ROOT, docker_compose, run_compose


@pytest.mark.skipif(docker_compose is None, reason="docker-compose not installed (make test installs it)")
def test_admin_port_is_loopback_only_with_the_token_from_env() -> None:
    result = run_compose("config")
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    config = load_config(APP_CONFIG)
    admin = config.tap.admin
    assert admin.listen is not None and admin.listen.port != config.tap.listen.port
    assert [t.token_env for t in admin.tokens] == ["GATEWAY_TAP_ADMIN_TOKEN"]
    assert services["tap"]["environment"]["GATEWAY_TAP_ADMIN_TOKEN"] == "change-me-admin-token"  # from .env
    assert "GATEWAY_TAP_ADMIN_TOKEN=" in ENV_EXAMPLE.read_text()
    published = [p for s in services.values() for p in s.get("ports") or []]
    # Debian's docker-compose prints short forms for host-ip bindings ("127.0.0.1:8081:9081/tcp").
    admin_ports = [p for p in published if (str(p.get("target")) if isinstance(p, dict) else
                                             str(p).split("/")[0].rsplit(":", 1)[-1]) == "9081"]
    assert len(admin_ports) == 1, published
    host_ip = admin_ports[0].get("host_ip") if isinstance(admin_ports[0], dict) else str(admin_ports[0]).split(":")[0]
    assert host_ip == "127.0.0.1", admin_ports
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert re.search(rf"server\s+tap:{admin.listen.port}\s+resolve;", nginx)
    assert re.search(r"listen 9081;\s+client_max_body_size 64k;", nginx)
    assert admin.max_body_bytes == 64 * 1024
