"""Operator commands about prices: ``gateway-tap prices MODEL``, ``gateway-tap reprice`` and check-config's
price warnings (docs/pricing.md)."""

from __future__ import annotations

import gzip
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import orjson

from gateway_tap.pricing import CLASSES, NO_CATALOG, PriceBook, RatePlan, catalog_version, reprice
from gateway_tap.settings import GatewayConfig
from schemas import Analytics, EventDecodeError, decode_event


def books(config: GatewayConfig) -> tuple[dict[str, PriceBook], list[str]]:
    """Each LLM's price book, and the problems (an unknown ``price_catalog``...), each naming its key."""
    found: dict[str, PriceBook] = {}
    problems: list[str] = []
    for llm in config.llms:
        try:
            found[llm.id] = PriceBook.for_llm(llm)
        except ValueError as exc:
            problems.append(str(exc))
    return found, problems


def warnings(config: GatewayConfig, found: dict[str, PriceBook], models: Sequence[str], at: datetime) -> list[str]:
    """What check-config warns about: LLMs where some model would cost 0, and ``models`` no price applies to."""
    out = []
    for llm in config.llms:
        book = found.get(llm.id)
        if book is None:
            continue
        if "*" not in llm.prices:
            if book.provider is None:
                priced = ", ".join(sorted(llm.prices)) or "none"
                out.append(f"llms[{llm.id}]: the price catalog is off and there is no '*' price: only these models "
                           f"have a price ({priced}); any other costs 0")
            else:
                out.append(f"llms[{llm.id}]: a model neither `prices` nor the {catalog_version()} catalog "
                           f"(provider {book.provider}) knows costs 0 (fine-tunes, new models): add a '*' price "
                           "to charge it")
        for model in book.unpriced(models, at):
            out.append(f"llms[{llm.id}]: no price for model {model!r}: its calls cost 0")
    return out


def _rates(plan: RatePlan) -> dict[str, Any]:
    return {"base": plan.base.per_1m_usd(),
            "tiers": [{"above_prompt_tokens": threshold, **rates.per_1m_usd()} for threshold, rates in plan.tiers]}


def explain(config: GatewayConfig | None, model: str, at: datetime, llm_id: str | None = None,
            provider: str = "openai") -> list[dict[str, Any]]:
    """What applies to ``model`` on each LLM of ``config`` (or ``llm_id``), or in the catalog alone."""
    if config is None:
        book = PriceBook("catalog", provider, {}, provider)
        plan = book.plan(model, at=at)
        return [{"llm": None, "provider": provider, "version": book.version, "model": model,
                 "source": plan.source if plan else None, **(_rates(plan) if plan else {})}]
    found, problems = books(config)
    if problems:
        raise ValueError("\n".join(problems))
    out = []
    for llm in config.llms:
        if llm_id is not None and llm.id != llm_id:
            continue
        book = found[llm.id]
        plan = book.plan(model, at=at)
        out.append({"llm": llm.id, "provider": book.provider or NO_CATALOG, "currency": llm.currency,
                    "version": book.version, "model": model, "source": plan.source if plan else None,
                    **(_rates(plan) if plan else {})})
    return out


def format_explained(rows: Sequence[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        head = f"llm {row['llm']}" if row["llm"] else "catalog"
        lines.append(f"{head}: {row['model']} -> {row['source'] or 'no price (costs 0)'}")
        lines.append(f"  price version {row['version']} (catalog provider {row['provider']})")
        if row["source"]:
            unit = row.get("currency", "USD")
            lines.append(f"  {unit} per 1M tokens: " + ", ".join(f"{c} {row['base'][c]:g}" for c in CLASSES))
            for tier in row["tiers"]:
                lines.append(f"  above {tier['above_prompt_tokens']:,} prompt tokens: "
                             + ", ".join(f"{c} {tier[c]:g}" for c in CLASSES))
    return "\n".join(lines)


def read_events(paths: Sequence[str], stdin: IO[bytes] | None = None) -> Iterator[bytes]:
    """The lines of JSON Lines files (``.gz`` too, as the file collector writes them; ``-`` is stdin)."""
    for path in paths or ["-"]:
        if path == "-":
            yield from (stdin or sys.stdin.buffer)
            continue
        opener: Any = gzip.open if path.endswith(".gz") else open
        with opener(Path(path), "rb") as lines:
            yield from lines


@dataclass
class RepriceTotals:
    """Per (LLM, stored price version): events, stored and re-priced micro-USD."""

    events: int = 0
    stored_micros: int = 0
    repriced_micros: int = 0
    mismatched: list[str] = field(default_factory=list)  # same version, different cost: never expected


@dataclass
class RepriceReport:
    groups: dict[tuple[str, str, str], RepriceTotals] = field(default_factory=dict)
    skipped: int = 0  # not analytics, undecodable, never priced, or an LLM the config does not have
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def reproduced(self) -> bool:
        return not any(t.mismatched for t in self.groups.values())


def reprice_lines(found: dict[str, PriceBook], lines: Iterable[bytes], keep_rows: bool = False) -> RepriceReport:
    """Re-price every priced analytics event of ``lines`` with ``found`` (the books of the config in force)."""
    report = RepriceReport()
    seen: set[str] = set()
    for line in lines:
        if not line.strip():
            continue
        try:
            event = decode_event(line, "analytics")
        except EventDecodeError:
            report.skipped += 1
            continue
        assert isinstance(event, Analytics)
        book = found.get(event.llm_id or "")
        if event.id in seen or book is None or event.price_version is None or event.cost_micros is None:
            report.skipped += event.id not in seen
            continue
        seen.add(event.id)  # the file collector is at-least-once: a redelivered event counts once
        cost = reprice(book, event)
        new = cost.total_micros if cost is not None else 0
        key = (event.llm_id or "", event.price_version, book.version)
        totals = report.groups.setdefault(key, RepriceTotals())
        totals.events += 1
        totals.stored_micros += event.cost_micros
        totals.repriced_micros += new
        if event.price_version == book.version and new != event.cost_micros:
            totals.mismatched.append(event.id)
        if keep_rows:
            report.rows.append({"id": event.id, "request_id": event.request_id, "app_id": event.app_id,
                                "llm_id": event.llm_id, "emitted_at": event.emitted_at.isoformat(),
                                "model": event.model, "price_version": event.price_version,
                                "cost_micros": event.cost_micros, "repriced_version": book.version,
                                "repriced_micros": new, "repriced_source": cost.source if cost else None})
    return report


def format_report(report: RepriceReport) -> str:
    lines = [f"{'llm':<16} {'stored version':<34} {'events':>7} {'stored USD':>14} {'repriced USD':>14} "
             f"{'difference':>12}"]
    for (llm, stored, current), t in sorted(report.groups.items()):
        note = "" if stored == current else f"  (now {current})"
        lines.append(f"{llm:<16} {stored:<34} {t.events:>7} {t.stored_micros / 1e6:>14.6f} "
                     f"{t.repriced_micros / 1e6:>14.6f} {(t.repriced_micros - t.stored_micros) / 1e6:>+12.6f}{note}")
        if t.mismatched:
            lines.append(f"  {len(t.mismatched)} event(s) of the same price version priced differently, e.g. "
                         f"{t.mismatched[0]}: report this as a bug")
    lines.append(f"skipped {report.skipped} line(s): not priced analytics events of a configured LLM")
    return "\n".join(lines)


def dump_rows(rows: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)
