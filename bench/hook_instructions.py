"""Instructions per plugin hook call (``PluginHook.run``, the hook engine's per-call work), per checkout, by callgrind.

A whole request (``bench/tap_instructions.py``) moves by a few percent between runs, more than one hook call
costs; this isolates the engine's own work. Each checkout runs a child under ``valgrind --tool=callgrind`` twice,
calling ``PluginHook.run`` ``0`` and ``--calls`` times on a hook that returns at once (``post_auth`` returning
None: a fresh ``HookContext``, the eager call, the result check, the latency histogram); the difference divided
by ``--calls`` is the cost of one call, start-up and imports cancelling out (``PYTHONHASHSEED=0``).

    .venv/bin/python -m bench.hook_instructions --roots ../before,. [--calls 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def child(root: str, calls: int) -> None:
    """Run ``calls`` hook calls through the engine of the checkout at ``root`` (nothing of gateway-tap is imported
    before ``root`` is first on the path)."""
    sys.path.insert(0, root)
    from prometheus_client import CollectorRegistry

    from gateway_tap.hooks import HookContext, HookResult, PluginServices, TapRequest
    from gateway_tap.plugins.chain import HookMetrics, PluginHook, RequestScope
    from gateway_tap.services import Gateway, MemoryKV

    async def post_auth(request: TapRequest, ctx: HookContext) -> HookResult | None:
        return None

    services = PluginServices(MemoryKV({}, "p"), __import__("logging").getLogger("p"),
                              Gateway.from_config((), ()), "p")
    hook = PluginHook("p", "post_auth", post_auth, config={}, services=services, timeout_s=1.0, fail_open=False,
                      metrics=HookMetrics(CollectorRegistry()))
    scope = RequestScope("req", "openai")

    async def run() -> None:
        for _ in range(calls):
            await hook.run(None, scope)

    asyncio.run(run())


def measure(root: Path, calls: int, tmp: Path) -> float:
    from bench.tap_instructions import instructions

    counts = []
    for n in (0, calls):
        out = tmp / f"{root.name}-{n}.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
                        "bench.hook_instructions", "--child", str(root), "--calls", str(n)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                       cwd=Path(__file__).resolve().parents[1])
        counts.append(instructions(out))
    return (counts[1] - counts[0]) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roots", default=".", help="Comma-separated checkouts, measured in this order.")
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        assert sys.modules["gateway_tap"].__file__.startswith(args.child), "measured another checkout"
        return
    with tempfile.TemporaryDirectory(prefix="hook-instr-") as tmp:
        for root in (Path(r).resolve() for r in args.roots.split(",")):
            print(f"{root}: {measure(root, args.calls, Path(tmp)):,.0f} instructions per hook call", flush=True)


if __name__ == "__main__":
    main()
