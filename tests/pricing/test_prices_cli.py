"""``gateway-tap prices``, ``gateway-tap reprice`` and check-config's price checks, through the CLI."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import yaml
from click.testing import CliRunner

from gateway_tap.cli import main
from gateway_tap.plugins.chain import Chain
from gateway_tap.proxy.accounting import Usage
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.proxy.upstream import Upstream
from gateway_tap.settings import parse_config
from schemas.wire import encode_wire, wire_type

LLMS: list[dict[str, Any]] = [
    {"id": "openai", "vendor": "openai", "upstream_url": "https://api.openai.com",
     "prices": {"gpt-4o-mini": {"input_per_1m": 0.2, "output_per_1m": 0.8}}},
    {"id": "local", "vendor": "openai", "upstream_url": "http://127.0.0.1:1", "price_catalog": "none",
     "prices": {"llama": {"input_per_1m": 0.01, "output_per_1m": 0.02}}},
]


def config_file(tmp_path: Path, llms: list[dict[str, Any]] = LLMS, name: str = "gw.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"gateway_id": "t", "llms": llms}))
    return str(path)


def test_prices_says_what_applies_and_where_it_came_from(tmp_path: Path) -> None:
    runner = CliRunner()
    path = config_file(tmp_path)
    got = runner.invoke(main, ["prices", "gpt-4o-mini", "--config", path, "--json"])
    assert got.exit_code == 0, got.output
    rows = {row["llm"]: row for row in orjson.loads(got.output)}
    assert rows["openai"]["source"] == "config:gpt-4o-mini" and rows["openai"]["base"]["input"] == 0.2
    assert rows["local"]["source"] is None and rows["local"]["provider"] == "none"
    dated = runner.invoke(main, ["prices", "gpt-4o-2024-08-06", "--config", path, "--llm", "openai"])
    assert "catalog:openai/gpt-4o" in dated.output and "cache_read 1.25" in dated.output
    tiers = runner.invoke(main, ["prices", "claude-sonnet-4-5", "--provider", "anthropic"])
    assert "above 200,000 prompt tokens: input 6" in tiers.output
    old = runner.invoke(main, ["prices", "o3", "--at", "2025-06-01T00:00:00Z", "--json"])
    assert orjson.loads(old.output)[0]["base"]["input"] == 10  # before the 2025-06-10 price cut


def test_check_config_names_a_bad_catalog_and_warns_for_models_without_a_price(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = config_file(tmp_path, [{**LLMS[0], "price_catalog": "no-such-provider"}], "bad.yaml")
    got = runner.invoke(main, ["check-config", bad])
    assert got.exit_code == 1 and "llms[openai].price_catalog: 'no-such-provider' is not a provider" in got.output
    ok = runner.invoke(main, ["check-config", config_file(tmp_path), "--model", "gpt-4o", "--model", "llama"])
    assert ok.exit_code == 0, ok.output
    assert "llms[local]: no price for model 'gpt-4o'" in ok.stderr
    assert "llms[openai]: no price for model 'llama'" in ok.stderr
    assert "llms[openai]: no price for model 'gpt-4o'" not in ok.stderr  # the catalog prices it
    assert "llms[local]: the price catalog is off and there is no '*' price" in ok.stderr


def events_of(config_path: str, count: int) -> list[bytes]:
    """Analytics values as the tap writes them (its Exchange, its prices, emitted at the pricing time)."""
    config = parse_config(yaml.safe_load(Path(config_path).read_text()))
    up = Upstream.build(config.llms[0], Chain())
    values = []
    for i in range(count):
        ex = Exchange(f"req_{i}", "POST", "/llm/openai/v1/chat/completions", "openai", 1.0)
        ex.vendor, ex.status, ex.finished, ex.app_id, ex.prices = "openai", 200, 1.5, "a", up.prices
        ex.requested_model = ["gpt-4o-mini", "gpt-4o", "o3-mini"][i % 3]
        ex.usage = Usage(prompt_tokens=1000 + 37 * i, completion_tokens=200 + i, total_tokens=1200 + 38 * i,
                         cache_read_tokens=128 * (i % 4), reasoning_tokens=i % 50, found=True,
                         model=ex.requested_model)
        now = datetime(2026, 12, 1 + i % 28, 10, 0, i % 60, tzinfo=UTC)
        ex.settle_cost(now)
        values += [encode_wire(e) for e in ex.events("t", capture_bodies=False, body_limit=0, now=now)
                   if wire_type(e) == "analytics"]
    return values


def test_reprice_reproduces_every_cost_for_the_same_version_and_reports_a_price_change(tmp_path: Path) -> None:
    runner = CliRunner()
    path = config_file(tmp_path)
    values = events_of(path, 60)
    file = tmp_path / "events.jsonl.gz"
    file.write_bytes(gzip.compress(b"".join(v + b"\n" for v in values + values[:5])))  # at-least-once: duplicates
    out = tmp_path / "repriced.jsonl"
    same = runner.invoke(main, ["reprice", "--config", path, "--out", str(out), str(file)])
    assert same.exit_code == 0, same.output
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert len(rows) == 60 and all(r["repriced_micros"] == r["cost_micros"] for r in rows)
    assert sum(r["cost_micros"] for r in rows) > 0 and "difference" in same.output

    changed = [{**LLMS[0], "prices": {"gpt-4o-mini": {"input_per_1m": 0.4, "output_per_1m": 1.6}}}, LLMS[1]]
    other = runner.invoke(main, ["reprice", "--config", config_file(tmp_path, changed, "new.yaml"), "--out",
                                 str(out), str(file)])
    assert other.exit_code == 0, other.output
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    mini = [r for r in rows if r["model"] == "gpt-4o-mini"]
    assert mini and all(r["repriced_micros"] > r["cost_micros"] for r in mini)  # doubled rates
    assert all(r["repriced_micros"] == r["cost_micros"] for r in rows if r["model"] != "gpt-4o-mini")  # catalog
    assert all(r["repriced_version"] != r["price_version"] for r in rows) and "(now genai-prices" in other.output

    tampered = orjson.loads(values[0])
    tampered["cost_micros"] += 1
    broken = runner.invoke(main, ["reprice", "--config", path, "-"], input=orjson.dumps(tampered) + b"\n")
    assert broken.exit_code == 1 and "report this as a bug" in broken.output
