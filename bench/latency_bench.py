"""Added latency at concurrency 1 and time to first token of streamed answers: direct vs bare proxy vs tap.

One request at a time (no queueing, so a latency is the request's own path), alternating the targets
request by request so the machine's load swings hit all three alike:

- **whole**: a small non-streamed chat completion; latency = request sent to body read;
- **stream**: a streamed chat completion (20 chunks, 1 ms apart at the mock); time to first token =
  request sent to the first chunk carrying content (the role-only first chunk does not count).

The tap is the full tap of ``bench.tap_bench`` (the demo config: three example plugins, budgets, events
to a local noida-db broker, access log off, 1 worker); the bare proxy is ``bench/bare_proxy.py``.

    .venv/bin/python -m bench.latency_bench [--requests 1000] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import psutil

from bench.tap_bench import APP_KEY, BODY, ROOT, STREAM_BODY, VARIANTS, Bench, _serving, write_section
from gateway_tap.dev.servers import ManagedProcess, free_port

TARGETS = ("direct", "bare", "tap")


@dataclass
class Samples:
    whole_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_whole(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    async with http.post(url, data=BODY, headers=headers) as resp:
        await resp.read()
        assert resp.status == 200, resp.status
    return (time.perf_counter() - start) * 1000


async def one_stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    first: float | None = None
    async with http.post(url, data=STREAM_BODY, headers={**headers, "x-mock-chunk-delay-ms": "1"}) as resp:
        assert resp.status == 200, resp.status
        async for line in resp.content:
            if first is None and b'"content":"tok' in line:
                first = time.perf_counter()
    assert first is not None, "no content chunk"
    return (first - start) * 1000


async def measure(urls: dict[str, str], requests: int) -> dict[str, Samples]:
    samples = {t: Samples() for t in urls}
    headers = {"content-type": "application/json", "authorization": f"Bearer {APP_KEY}"}
    async with aiohttp.ClientSession() as http:
        for url in urls.values():  # warm-up: connections, lazy imports, caches
            for _ in range(50):
                await one_whole(http, url, headers)
                await one_stream(http, url, headers)
        for i in range(requests):
            order = list(urls) if i % 2 == 0 else list(urls)[::-1]
            for target in order:
                samples[target].whole_ms.append(await one_whole(http, urls[target], headers))
            for target in order:
                samples[target].ttft_ms.append(await one_stream(http, urls[target], headers))
    return samples


def markdown(samples: dict[str, Samples], requests: int, load: tuple[float, float]) -> str:
    lines = [
        "## Latency",
        "",
        f"`python -m bench.latency_bench --requests {requests}`: one request at a time, the three targets "
        "alternating request by request, in front of the same mock (see the script's docstring). Load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end (2 cores, shared).",
        "",
        "| target | whole: p50 ms | whole: p99 ms | stream, time to first token: p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for target, s in samples.items():
        lines.append(f"| {target} | {pct(s.whole_ms, 0.5):.2f} | {pct(s.whole_ms, 0.99):.2f} | "
                     f"{pct(s.ttft_ms, 0.5):.2f} | {pct(s.ttft_ms, 0.99):.2f} |")
    direct = samples["direct"]
    lines += ["", "| added over direct | whole p50 | whole p99 | time to first token p50 | p99 |",
              "|---|---|---|---|---|"]
    for target in ("bare", "tap"):
        s = samples[target]
        lines.append(f"| {target} | {pct(s.whole_ms, 0.5) - pct(direct.whole_ms, 0.5):+.2f} ms | "
                     f"{pct(s.whole_ms, 0.99) - pct(direct.whole_ms, 0.99):+.2f} ms | "
                     f"{pct(s.ttft_ms, 0.5) - pct(direct.ttft_ms, 0.5):+.2f} ms | "
                     f"{pct(s.ttft_ms, 0.99) - pct(direct.ttft_ms, 0.99):+.2f} ms |")
    tap = samples["tap"]
    lines += ["", f"Mean whole-request latency: direct {statistics.fmean(direct.whole_ms):.2f} ms, "
              f"tap {statistics.fmean(tap.whole_ms):.2f} ms."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="Requests of each kind per target.")
    parser.add_argument("--write", action="store_true", help="Replace the '## Latency' section of BENCHMARKS.md.")
    args = parser.parse_args()
    load_start = psutil.getloadavg()[0]
    with Bench(1, [1], 1.0) as bench:
        port = free_port()
        bare = ManagedProcess("bare", [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), "--upstream",
                                       bench.mock_url, "--port", str(port), "--workers", "1"],
                              ready=lambda: _serving(port), log_path=bench.tmp / "bare.log", stop_signal=15).start()
        tap, base = bench.start_tap(VARIANTS["plugins"], 1, ROOT, "after")
        try:
            urls = {"direct": f"{bench.mock_url}/v1/chat/completions",
                    "bare": f"http://127.0.0.1:{port}/v1/chat/completions",
                    "tap": f"{base}/llm/openai/v1/chat/completions"}
            samples = asyncio.run(measure(urls, args.requests))
        finally:
            tap.stop()
            bare.stop()
    text = markdown(samples, args.requests, (load_start, psutil.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
