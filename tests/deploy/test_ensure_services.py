"""scripts/ensure-services.sh installs the Debian packages the suite needs without starting their services
and without touching anything already running (it used to ``pkill -x prometheus`` every Prometheus).

Run with a PATH of stubs: ``apt-get`` records what it was asked and whether service starts were refused at
that moment; ``pkill``, ``systemctl`` and ``service`` record any call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ensure-services.sh"
REAL_TOOLS = ("sort", "chmod", "rm", "seq", "ls", "sleep", "cat", "tail")


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """A bin dir with the few real tools the script uses, and recording stubs for the rest (none of the
    packages it checks for, so it decides to install all of them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in REAL_TOOLS:
        real = shutil.which(tool)
        assert real, tool
        (bin_dir / tool).symlink_to(real)
    calls = tmp_path / "calls.log"
    scripts = {
        "id": 'echo 0',
        "apt-get": f'if [ "$1" = install ]; then echo "apt-get $* | policy: $(cat "$GATEWAY_TAP_POLICY_RC_D" '
                   f'2>/dev/null | tail -1) $(test -x "$GATEWAY_TAP_POLICY_RC_D" && echo executable)" >>{calls}; fi',
        "pkill": f'echo "pkill $*" >>{calls}',
        "systemctl": f'echo "systemctl $*" >>{calls}',
        "service": f'echo "service $*" >>{calls}',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def run_script(bin_dir: Path, policy: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": str(bin_dir), "GATEWAY_TAP_POLICY_RC_D": str(policy), "HOME": os.environ.get("HOME", "/")}
    bash = shutil.which("bash")
    assert bash
    return subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def postgres_is_up() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not postgres_is_up(), reason="the script first waits for PostgreSQL on :5432")


def test_packages_install_with_service_starts_refused_and_nothing_killed(stubs: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    done = run_script(stubs, policy)
    assert done.returncode == 0, done.stderr
    assert "installing Debian packages: docker-compose prometheus redis-server wrk" in done.stdout
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["apt-get install -y -qq --no-install-recommends docker-compose prometheus redis-server wrk "
                     "| policy: exit 101 executable"]
    assert not policy.exists()  # removed after the install


def test_an_existing_policy_is_left_as_it_was(stubs: Path, tmp_path: Path) -> None:
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# the machine's own\nexit 0\n")
    policy.chmod(0o755)
    done = run_script(stubs, policy)
    assert done.returncode == 0, done.stderr
    assert policy.read_text() == "#!/bin/sh\n# the machine's own\nexit 0\n"
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert calls == ["apt-get install -y -qq --no-install-recommends docker-compose prometheus redis-server wrk "
                     "| policy: exit 0 executable"]
