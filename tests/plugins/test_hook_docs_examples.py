"""The runnable examples of docs/writing-hooks.md (custom endpoints and their harness test) run as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "writing-hooks.md"


def _block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (found,) = [b for b in blocks if containing in b]
    return found


async def test_custom_endpoint_example_and_its_harness_test_run() -> None:
    module = types.ModuleType("writing_hooks_example")  # a real module: the harness loads plugins by module:Class
    sys.modules[module.__name__] = module
    try:
        exec("from gateway_tap.plugins.testing import PluginHarness\n" + _block("class McpRelay")
             + _block("async def test_session_endpoint"), module.__dict__)
        await module.test_session_endpoint()
    finally:
        del sys.modules[module.__name__]
