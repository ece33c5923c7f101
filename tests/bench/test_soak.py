"""The soak in its short form (bench/soak.py --short): the whole pipeline under every fault once.

It starts its own servers (two noida-db processes so Elasticsearch can be stopped alone, the mock
LLM, the tap, four collector processes) and a PostgreSQL database of its own, so it shares nothing
with the session fixtures. Only outcomes are asserted (no timings): zero missing events in every
sink, exact budget totals, overspend within its bound, the DLQ, no unexpected process exit.
"""

from __future__ import annotations

import pytest

from bench.soak import run_soak, short_options


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_short_soak_loses_nothing_and_accounts_exactly(pg_admin_dsn: str) -> None:
    report = await run_soak(short_options(pg_admin_dsn=pg_admin_dsn))
    failed = [f"{name}: {detail}" for name, ok, detail in report.checks() if not ok]
    assert not failed, "\n".join(failed) + "\n\n" + report.table()
    assert report.soak.faults, "the fault schedule ran"
    assert sum(1 for s in report.soak.samples if isinstance(s.status, int)) > 1000
