"""The committed Grafana JSON is what dashboards/generate.py builds, and every query is well formed.

The live check (every Prometheus query returns data from a live tap and live collectors) is
tests/dashboards/test_dashboards_live.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from dashboards.generate import DASHBOARDS, JSON_DIR, concrete, prometheus_queries, render
from gateway_tap.metrics_docs import collector_registry, describe, tap_registry

PROVISIONING = JSON_DIR.parent / "provisioning"
SERIES_SUFFIXES = ("_bucket", "_count", "_sum")


def documents() -> dict[str, dict[str, Any]]:
    return {name: orjson.loads((JSON_DIR / f"{name}.json").read_bytes()) for name in DASHBOARDS}


def known_series() -> set[str]:
    names = {m.name for m in describe(tap_registry()) + describe(collector_registry())}
    return names | {n + s for n in names for s in SERIES_SUFFIXES} | {"up"}


@pytest.mark.parametrize("name", list(DASHBOARDS))
def test_committed_json_is_current(name: str) -> None:
    path = JSON_DIR / f"{name}.json"
    assert path.exists() and path.read_text() == render(name), f"{path} is stale: python -m dashboards.generate"


def test_no_stray_dashboard_files() -> None:
    assert {p.stem for p in JSON_DIR.glob("*.json")} == set(DASHBOARDS)


def test_datasources_match_provisioning() -> None:
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    uids = {(ds["type"], ds["uid"]) for ds in provisioned["datasources"]}
    used = set()
    for doc in documents().values():
        for panel in doc["panels"]:
            for ref in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
                if ref:
                    used.add((ref["type"], ref["uid"]))
        for var in doc.get("templating", {}).get("list", []):
            used.add((var["datasource"]["type"], var["datasource"]["uid"]))
    assert used == uids


def test_panels_have_unique_ids_and_uids_are_unique() -> None:
    docs = documents()
    assert len({d["uid"] for d in docs.values()}) == len(docs)
    for doc in docs.values():
        ids = [p["id"] for p in doc["panels"]]
        assert len(ids) == len(set(ids)) and 0 not in ids, doc["uid"]


def test_required_panels_exist() -> None:
    titles = {name: " | ".join(p["title"] for p in doc["panels"]) for name, doc in documents().items()}
    for name, words in {
        "tap": ["Requests/s by status class", "Request latency", "Tap overhead", "Upstream latency",
                "Time to first byte", "Hook latency", "Publish queue depth", "Spool depth"],
        "pipeline": ["Events handled/s by collector and type", "Consumer lag", "Batch duration", "Retries",
                     "Dead letters", "Freshness p99"],
        "usage": ["Tokens/s by app and model", "Spend (USD/hour) by app and model", "Top apps by spend"],
        "budgets": ["Spend vs limit per app", "Apps over 80%"],
    }.items():
        for word in words:
            assert word in titles[name], f"{name}: no panel {word!r}"


def test_top_apps_panel_queries_elasticsearch_analytics() -> None:
    panel = next(p for p in documents()["usage"]["panels"] if p["title"].startswith("Top apps by spend"))
    assert panel["datasource"] == {"type": "elasticsearch", "uid": "elasticsearch"}
    target = panel["targets"][0]
    assert target["timeField"] == "emitted_at"
    assert target["metrics"] == [{"field": "cost", "id": "1", "type": "sum"}]
    assert target["bucketAggs"][0]["field"] == "app_id" and target["bucketAggs"][0]["settings"]["orderBy"] == "1"
    # The index pattern is the data source's (gateway-analytics-*), where the elasticsearch collector writes.
    provisioned = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())
    es = next(ds for ds in provisioned["datasources"] if ds["uid"] == "elasticsearch")
    assert es["jsonData"]["index"] == "gateway-analytics-*"


def test_queries_use_only_registered_metrics() -> None:
    known = known_series()
    for name, doc in documents().items():
        for title, expr in prometheus_queries(doc):
            bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)  # drop selectors, ranges, strings
            words = set(re.findall(r"[a-z_][a-z0-9_]*", bare))
            metrics = {w for w in words if w.startswith("gateway_tap_") or w == "up"}
            assert metrics, f"{name} / {title}: no metric in {expr}"
            assert metrics <= known, f"{name} / {title}: unknown {metrics - known}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make test installs it)")
def test_every_query_parses(tmp_path: Path) -> None:
    """promtool checks PromQL syntax of rules: each panel query becomes a recording rule."""
    rules = [{"record": f"dashboard:q{i}", "expr": concrete(expr)}
             for i, (_, expr) in enumerate(q for doc in documents().values() for q in prometheus_queries(doc))]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rules)} rules found" in result.stdout
