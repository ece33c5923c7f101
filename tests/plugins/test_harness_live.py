"""PluginHarness drives what a live tap does to a plugin: budget answers chosen by the test, and a config change
(``reconfigure``) applied as the tap applies a reload or an admin API change (validated first, then
``on_config_change`` or a fresh instance, through the tap's own ``load_plugins``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from gateway_tap.hooks import HookContext, HookResult, PluginServices, TapRequest
from gateway_tap.plugins import PluginLoadError
from gateway_tap.plugins.testing import PluginHarness

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"warn_at": {"type": "number", "minimum": 0, "maximum": 100, "default": 90}}}


def report(app_id: str, percent: float, exceeded: bool = False) -> dict[str, Any]:
    """What the tap's ``budget_status`` answers (``GET /budget``)."""
    return {"app_id": app_id, "llm_id": None, "enforced": True, "store_available": True,
            "budgets": [{"period": "monthly", "limit_usd": 10.0, "spent_usd": percent / 10, "percent_used": percent,
                         "exceeded": exceeded}]}


class BudgetWarner:
    """Tags requests of apps near their budget, refuses those past it (before the gateway's own check would)."""

    closed: ClassVar[list[float]] = []

    def config_schema(self) -> Mapping[str, Any]:
        return SCHEMA

    async def initialize(self, config: Mapping[str, Any], services: PluginServices) -> None:
        self.warn_at = config["warn_at"]
        self.services = services
        await services.kv.incr("initialized")

    async def post_auth(self, request: TapRequest, ctx: HookContext) -> HookResult | None:
        status = await ctx.services.gateway.budget_status(ctx.app_id or "", ctx.llm_id)
        if status is None:
            return HookResult.modify(metadata={"budget": "none"})
        used = max((b["percent_used"] for b in status["budgets"]), default=0.0)
        if any(b["exceeded"] for b in status["budgets"]):
            return HookResult.stop(429, "over budget", code="insufficient_quota")
        return HookResult.modify(metadata={"budget": "low" if used >= self.warn_at else "ok"})

    async def close(self) -> None:
        BudgetWarner.closed.append(self.warn_at)


class TellsChanges(BudgetWarner):
    """Takes a new config in place; refuses ``warn_at: 13``."""

    changes: ClassVar[list[Mapping[str, Any]]] = []

    async def on_config_change(self, config: Mapping[str, Any]) -> None:
        if config["warn_at"] == 13:
            raise ValueError("unlucky")
        TellsChanges.changes.append(config)
        self.warn_at = config["warn_at"]


async def _budget_tag(h: PluginHarness, app_id: str = "demo") -> str | None:
    sent = await h.request(json=CHAT, app_id=app_id)
    if sent.stopped is not None:
        return f"{sent.stopped.status} {sent.stopped.code}"
    return sent.metadata["budget"]


async def test_budget_status_answers_are_injected() -> None:
    async with PluginHarness(BudgetWarner, budget_status={"demo": report("demo", 50)}) as h:
        assert await _budget_tag(h) == "ok"
        h.budget_status = {"demo": report("demo", 95)}  # changed between requests
        assert await _budget_tag(h) == "low"
        h.budget_status["demo"] = report("demo", 100, exceeded=True)
        assert await _budget_tag(h) == "429 insufficient_quota"
        assert await _budget_tag(h, "other") == "none"  # no answer for that app

    seen: list[tuple[str, str | None]] = []

    async def per_llm(app_id: str, llm_id: str | None) -> Mapping[str, Any] | None:
        seen.append((app_id, llm_id))
        return report(app_id, 99 if llm_id == "claude" else 10)

    async with PluginHarness(BudgetWarner, budget_status=per_llm, llm_id="claude", vendor="anthropic") as h:
        assert await _budget_tag(h) == "low"
    assert seen == [("demo", "claude")]
    async with PluginHarness(BudgetWarner) as h:  # a tap without budgets answers None
        assert await _budget_tag(h) == "none"


async def test_reconfigure_tells_a_plugin_with_on_config_change() -> None:
    TellsChanges.changes.clear()
    async with PluginHarness(TellsChanges, budget_status={"demo": report("demo", 50)}) as h:
        first = h.plugin
        assert await _budget_tag(h) == "ok"
        await h.reconfigure({"warn_at": 40})
        assert h.plugin is first and TellsChanges.changes == [{"warn_at": 40}]
        assert await _budget_tag(h) == "low"
        await h.reconfigure({})  # the schema's default, as in the tap
        assert TellsChanges.changes[-1] == {"warn_at": 90} and h.settings.config == {"warn_at": 90}
        assert await _budget_tag(h) == "ok"
        # Refused by the plugin: nothing changes.
        with pytest.raises(PluginLoadError, match=r"plugins\[0\]\.config: on_config_change failed: ValueError"):
            await h.reconfigure({"warn_at": 13})
        assert h.plugin.warn_at == 90 and h.settings.config == {"warn_at": 90}


async def test_reconfigure_replaces_a_plugin_without_it_and_validates_first() -> None:
    BudgetWarner.closed.clear()
    async with PluginHarness(BudgetWarner, budget_status={"demo": report("demo", 50)}) as h:
        first = h.plugin
        with pytest.raises(PluginLoadError, match=r"plugins\[0\]\.config\.warn_at: 200 is greater than the maximum"):
            await h.reconfigure({"warn_at": 200})
        assert h.plugin is first and BudgetWarner.closed == []  # the invalid config changed nothing
        await h.reconfigure({"warn_at": 40})
        assert h.plugin is not first and h.plugin.warn_at == 40
        assert BudgetWarner.closed == [90]  # the old instance was closed
        assert await h.plugin.services.kv.get("initialized") == 2  # same kv data, as in the tap
        assert await _budget_tag(h) == "low"
    assert BudgetWarner.closed == [90, 40]
