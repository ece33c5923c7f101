"""docs/configuration.md is current, lists every key, and the reloaders read the same live/restart marks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from collectors import reload as collector_reload
from gateway_tap.config_docs import KeyDoc, builtin_collectors, describe, render
from gateway_tap.proxy import reload as tap_reload
from gateway_tap.settings import CollectorSettings, GatewayConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"

# Numbers whose name says they are a duration or a size must say the unit too.
DURATION = re.compile(r"timeout|interval|backoff|delay|ttl|grace|linger|staleness|wait|after")
UNITS = ("_ms", "_s", "_days")


def every_key() -> list[KeyDoc]:
    """The rows of the document (a section documented once is referred to afterwards, as render() does)."""
    seen: dict[type[BaseModel], str] = {}
    rows = describe(GatewayConfig, "", False, seen)
    for name, model in builtin_collectors():
        rows += describe(model, f"collectors.{name}.config.", False, seen)
    return rows


def test_committed_doc_is_current() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: python -m gateway_tap.config_docs > " \
                                        "docs/configuration.md"


def test_doc_lists_every_key_once() -> None:
    text = DOC.read_text()
    for row in every_key():
        cell = row.path.replace("<", "\\<")
        assert text.count(f"| `{cell}` |") == 1, row.path


@pytest.mark.parametrize("row", every_key(), ids=lambda r: r.path)
def test_every_key_is_described_and_named_with_its_unit(row: KeyDoc) -> None:
    assert row.description, f"{row.path}: add a description= to the field (it is the documentation)"
    name = row.path.rsplit(".", 1)[-1]
    if row.type in ("integer", "number", "integer or null", "number or null"):
        if DURATION.search(name):
            assert name.endswith(UNITS), f"{row.path}: a duration names its unit ({', '.join(UNITS)})"
        if "bytes" in name:
            assert name.endswith("_bytes"), f"{row.path}: a size ends in _bytes"


def test_reloaders_read_the_marks_the_doc_shows() -> None:
    """One source: what the doc calls restart is exactly what the tap and collector reloaders report."""
    restart = {r.path for r in describe(GatewayConfig) if r.restart}
    tap_tops = {p for p in restart if not any(p.startswith(q + ".") for q in restart)}
    tap_tops = {p for p in tap_tops if not p.startswith("collectors.")}
    assert set(tap_reload.RESTART_KEYS) == tap_tops
    assert set(tap_reload.RESTART_KEYS) >= {"kafka", "tap.listen", "tap.workers", "tap.publisher", "budget_store"}
    collector_rows = describe(CollectorSettings)
    assert set(collector_reload.RESTART_KEYS) == {r.path for r in collector_rows if r.restart and "." not in r.path}
    assert set(collector_reload.LIVE_KEYS) == {r.path for r in collector_rows if not r.restart and "." not in r.path}
    assert set(collector_reload.LIVE_KEYS) == {"batch", "max_in_flight_batches", "max_in_flight_bytes", "retry",
                                              "shutdown_grace_s", "config"}


def test_a_section_documented_once_is_referred_to_afterwards() -> None:
    budget = dict(builtin_collectors())["budget"]
    rows = {r.path: r for r in describe(budget, "collectors.budget.config.", seen=_sections_of(GatewayConfig))}
    assert "Same keys as `budget_store`" in rows["collectors.budget.config.store"].description
    assert not any(p.startswith("collectors.budget.config.store.") for p in rows)


def _sections_of(model: type[BaseModel]) -> dict[type[BaseModel], str]:
    seen: dict[type[BaseModel], str] = {}
    describe(model, "", False, seen)
    return seen
