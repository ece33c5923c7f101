"""Shared helpers for the ``gateway-tap`` operator commands (status, replay, dlq): a config file with the
file collector in a group of the test's own, and the CLI runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

RUNNER = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not fold names in the tables


def ops_config(tmp_path: Path, kafka_bootstrap: str, topic_prefix: str, **extra: Any) -> dict[str, Any]:
    """The file collector in a group of this test's own, a SQLite budget store and one budget."""
    return {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "topic_prefix": topic_prefix},
        "collectors": {"file": {"group_id": f"{topic_prefix}-file", "metrics": {"port": None},
                                "batch": {"max_events": 100, "max_wait_ms": 20},
                                "config": {"directory": str(tmp_path / "files")}}},
        "budget_store": {"sqlite_path": str(tmp_path / "budgets.sqlite3")},
        **extra,
    }


def write_config(tmp_path: Path, document: dict[str, Any]) -> str:
    path = tmp_path / "gateway-tap.yaml"
    path.write_text(yaml.safe_dump(document))
    return str(path)
