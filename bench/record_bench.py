"""The tap's per-request bookkeeping without the HTTP stack, before/after: budget admit, the record step
(metrics, events built, encoded and queued for the producer, budget settle), in one process.

The end-to-end bench (``bench.tap_bench``) measures whole requests, whose CPU swings by tens of percent
on this shared machine; this one runs only the tap's own code for a finished request, so two versions
can be compared within a few percent. It builds the app of the demo ``gateway-tap.yaml`` (budgets on,
a hard daily budget added, no plugins) with the checkout's own ``create_app``, then for every request:
``BudgetGate.admit`` then ``TapApp.record`` (the publisher is not started: events stop in its queue,
which is emptied now and then; Kafka's own cost is ``bench.producer_bench``'s).

    .venv/bin/python bench/record_bench.py --compare ../main . [--repeat 5] [--n 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello benchmark"}],"max_tokens":4}'


async def measure(n: int) -> dict[str, float]:
    import yaml
    from multidict import CIMultiDict

    try:
        from gateway_tap.settings import load_config
    except ImportError:  # a checkout from before settings had their own package
        from gateway_tap.config import load_config  # type: ignore[no-redef]
    from gateway_tap.hooks import TapRequest
    from gateway_tap.proxy.accounting import Usage
    from gateway_tap.proxy.app import create_app
    from gateway_tap.proxy.exchange import Exchange

    tmp = Path(tempfile.mkdtemp(prefix="record-bench-"))
    try:
        from gateway_tap.examples import DEMO_CONFIG
    except ImportError:  # a checkout from before the examples had their own package
        DEMO_CONFIG = ROOT / "examples" / "gateway-tap.yaml"
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    doc["budget_store"]["sqlite_path"] = str(tmp / "budgets.sqlite3")
    doc["budgets"].append({"app_id": "demo", "limit_usd": 1e6, "period": "daily", "mode": "hard"})
    doc["tap"].update(access_log=False, publisher={"spool_dir": str(tmp / "spool")})
    doc["plugins"], doc["collectors"] = [], {}
    (tmp / "tap.yaml").write_text(yaml.safe_dump(doc))
    tap = await create_app(load_config(str(tmp / "tap.yaml")))
    assert tap.budget is not None
    await tap.budget.start()
    snap, queue = tap.snapshot, tap.publisher._queue  # type: ignore[attr-defined]
    headers = {"Host": "127.0.0.1:8080", "Content-Type": "application/json", "Authorization": "Bearer sk-x",
               "Content-Length": "99", "User-Agent": "wrk"}
    out = {"admit": 0.0, "record": 0.0}
    for i in range(n):
        ex = Exchange(f"req_{i:032x}", "POST", "/llm/openai/v1/chat/completions", "openai", time.perf_counter())
        ex.vendor, ex.app_id, ex.client_address, ex.user_agent = "openai", "demo", "127.0.0.1", "wrk"
        ex.request_headers = CIMultiDict(headers)
        ex.model = ex.requested_model = "gpt-4o-mini"
        req = TapRequest("POST", "v1/chat/completions", "", CIMultiDict(headers), BODY, "127.0.0.1")
        c0 = time.process_time()
        await tap.budget.admit(req, ex)
        c1 = time.process_time()
        ex.status, ex.response_headers = 200, {"content-type": "application/json", "x-request-id": ex.request_id}
        ex.upstream_start = ex.ttfb = ex.first_chunk = ex.upstream_end = ex.finished = time.perf_counter()
        ex.usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7, found=True, model="gpt-4o-mini",
                         choices=1, tool_calls=0)
        ex.cost = (3 * 0.15 + 4 * 0.6) / 1e6
        c2 = time.process_time()
        tap.record(ex, snap)
        c3 = time.process_time()
        out["admit"] += c1 - c0
        out["record"] += c3 - c2
        if len(queue) > 5000:
            queue.clear()
    await tap.budget.stop()
    await tap.session.close()
    return {k: v / n * 1e6 for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="Measure this checkout (one run, JSON on stdout).")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    if args.root is not None:
        sys.path.insert(0, str(args.root.resolve()))
        import orjson

        print(orjson.dumps(asyncio.run(measure(args.n))).decode())
        return
    import orjson

    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    for i in range(args.repeat):
        order = [("before", args.compare[0]), ("after", args.compare[1])]
        for version, root in (order if i % 2 == 0 else order[::-1]):
            out = subprocess.run([sys.executable, __file__, "--root", str(root), "--n", str(args.n)],
                                 capture_output=True, text=True, check=True).stdout
            runs[version].append(orjson.loads(out.strip().splitlines()[-1]))
            print(version, runs[version][-1], flush=True)
    print(f"\n| step (CPU µs per request, median of {args.repeat}) | before | after |\n|---|---|---|")
    for step in ("admit", "record"):
        before = statistics.median(r[step] for r in runs["before"])
        after = statistics.median(r[step] for r in runs["after"])
        print(f"| {step} | {before:.1f} | {after:.1f} |")


if __name__ == "__main__":
    main()
