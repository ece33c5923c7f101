"""``gateway-tap up``: start the local stack, show its panel until Ctrl-C / SIGTERM, stop it.

Sits above :mod:`gateway_tap.dev.stack` (the components) and :mod:`gateway_tap.dev.panel` (the view),
so neither imports the other's caller.
"""

from __future__ import annotations

import signal

from gateway_tap.dev.panel import Monitor, show
from gateway_tap.dev.servers import StartupError
from gateway_tap.dev.stack import Interrupted, LocalStack

DEMO_KEYS = {"demo": "gt-demo-key", "demo-tiny": "gt-demo-tiny-key"}


def run_stack(stack: LocalStack, demo_traffic: bool = False, interactive: bool | None = None) -> int:
    """Start ``stack``, show the panel until Ctrl-C/SIGTERM, then stop everything; returns the exit code."""
    # Installed explicitly: a shell starting us in the background may have set SIGINT to "ignore".
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stack.stopping.set())
    traffic = None
    try:
        stack.prepare()
        stack.start()
        _print_ready(stack)
        if demo_traffic:
            from gateway_tap.dev.demo_traffic import DemoTraffic

            traffic = DemoTraffic(f"http://127.0.0.1:{stack.ports.tap}", DEMO_KEYS)
            traffic.start()
        with Monitor(stack, traffic) as monitor:
            show(monitor, stack.stopping, interactive)
        return 0
    except Interrupted:
        return 0
    except StartupError as exc:
        stack.say(f"error: {exc}")
        return 1
    finally:
        if traffic is not None:
            traffic.stop()
        started = bool(stack.components)
        stack.stop()
        if started:
            stack.say("stopped")


def _print_ready(stack: LocalStack) -> None:
    for name, url in stack.endpoints().items():
        stack.say(f"  {name:<18} {url}")
    stack.say("  demo keys          gt-demo-key (app demo), gt-demo-tiny-key (app demo-tiny, tiny budget)")
    stack.say(f"  status             gateway-tap status --config {stack.config_path}")
    stack.say("ready; press Ctrl-C to stop")
