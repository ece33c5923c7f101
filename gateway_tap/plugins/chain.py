"""The hook chain: composed once per LLM at start-up, then only iterated on the hot path.

Every call goes through :class:`BoundHook`, which applies the plugin's timeout,
measures latency per plugin and hook, and turns a failure into either "skip this
hook" (``fail_open``) or :class:`HookFailed` (``fail_closed``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway_tap.hooks import (
    AuthHook,
    HookContext,
    PluginServices,
    PostAuthHook,
    PreAuthHook,
    ResponseHook,
)
from gateway_tap.plugins.loader import LoadedPlugin
from gateway_tap.proxy.metrics import TapMetrics

log = logging.getLogger(__name__)

SKIPPED: Any = object()
"""Returned by :meth:`BoundHook.call` when a fail-open hook failed: act as if it had not run."""


class RequestInfo(Protocol):
    """What the chain needs to know about the request in flight."""

    request_id: str
    llm_id: str
    vendor: str
    app_id: str | None
    user_id: str | None
    model: str | None
    metadata: dict[str, str]
    plugin_state: dict[str, dict[str, Any]]


class HookFailed(Exception):
    """A fail-closed hook raised or timed out."""

    def __init__(self, plugin: str, hook: str, reason: str, timed_out: bool) -> None:
        super().__init__(f"{plugin}.{hook}: {reason}")
        self.plugin = plugin
        self.hook = hook
        self.reason = reason
        self.timed_out = timed_out


class BoundHook:
    """One plugin's hook with its policy and metric children resolved up front."""

    __slots__ = ("_errors", "_latency", "config", "fail_open", "fn", "hook", "plugin", "services", "timeout_s")

    def __init__(self, plugin: str, hook: str, fn: Callable[..., Awaitable[Any]], *, config: Mapping[str, Any],
                 services: PluginServices, timeout_s: float, fail_open: bool, metrics: TapMetrics) -> None:
        self.plugin = plugin
        self.hook = hook
        self.fn = fn
        self.config = config
        self.services = services
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self._latency = metrics.hook_seconds.labels(plugin, hook)
        self._errors = {kind: metrics.hook_errors.labels(plugin, hook, kind) for kind in ("exception", "timeout")}

    def context(self, info: RequestInfo) -> HookContext:
        state = info.plugin_state.get(self.plugin)
        if state is None:
            state = info.plugin_state[self.plugin] = {}
        return HookContext(info.request_id, info.llm_id, info.vendor, self.plugin, self.config, self.services,
                           info.metadata, info.app_id, info.user_id, info.model, state)

    async def call(self, arg: Any, info: RequestInfo) -> Any:
        """Run the hook on ``arg``; :data:`SKIPPED` when a fail-open hook failed.

        :raises HookFailed: a fail-closed hook raised or exceeded its timeout.
        """
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self.fn(arg, self.context(info))
        except TimeoutError:
            return self._failed(info, "timeout", f"timed out after {self.timeout_s * 1000:.0f} ms")
        except Exception as exc:
            return self._failed(info, "exception", repr(exc))
        finally:
            self._latency.observe(time.perf_counter() - start)

    def _failed(self, info: RequestInfo, kind: str, reason: str) -> Any:
        self._errors[kind].inc()
        log.warning("hook failed", extra={"plugin": self.plugin, "hook": self.hook, "request_id": info.request_id,
                                          "reason": reason, "on_error": "fail_open" if self.fail_open else
                                          "fail_closed"})
        if self.fail_open:
            return SKIPPED
        raise HookFailed(self.plugin, self.hook, reason, kind == "timeout")


@dataclass(frozen=True, slots=True)
class Chain:
    """The hooks of one LLM, in run order."""

    pre_auth: tuple[BoundHook, ...] = ()
    auth: tuple[BoundHook, ...] = ()
    post_auth: tuple[BoundHook, ...] = ()
    response_headers: tuple[BoundHook, ...] = ()
    response_chunk: tuple[BoundHook, ...] = ()


def _attached(plugin: LoadedPlugin, llm_id: str) -> bool:
    return "*" in plugin.settings.llms or llm_id in plugin.settings.llms


def _bind(plugin: LoadedPlugin, hook: str, fn: Callable[..., Awaitable[Any]], metrics: TapMetrics) -> BoundHook:
    s = plugin.settings
    return BoundHook(s.name, hook, fn, config=s.config, services=plugin.services, timeout_s=s.timeout_ms / 1000,
                     fail_open=s.on_error == "fail_open", metrics=metrics)


def build_chains(plugins: Sequence[LoadedPlugin], llm_ids: Iterable[str], metrics: TapMetrics, *,
                 builtin_post_auth: Sequence[BoundHook] = (),
                 builtin_post_auth_after: Sequence[BoundHook] = ()) -> dict[str, Chain]:
    """One frozen :class:`Chain` per LLM id. ``plugins`` are already in run order.

    ``builtin_post_auth`` are the gateway's own post-auth steps (budget enforcement):
    they run before any plugin's post-auth hook, on every LLM; ``builtin_post_auth_after``
    run after them (``budget_enforcement.position: after_plugins``).
    """
    chains = {}
    for llm_id in llm_ids:
        attached = [p for p in plugins if _attached(p, llm_id)]
        chains[llm_id] = Chain(
            pre_auth=tuple(_bind(p, "pre_auth", p.instance.pre_auth, metrics)
                           for p in attached if isinstance(p.instance, PreAuthHook)),
            auth=tuple(_bind(p, "authenticate", p.instance.authenticate, metrics)
                       for p in attached if isinstance(p.instance, AuthHook)),
            post_auth=(*builtin_post_auth, *(_bind(p, "post_auth", p.instance.post_auth, metrics)
                                             for p in attached if isinstance(p.instance, PostAuthHook)),
                       *builtin_post_auth_after),
            response_headers=tuple(_bind(p, "on_response_headers", p.instance.on_response_headers, metrics)
                                   for p in attached if isinstance(p.instance, ResponseHook)),
            response_chunk=tuple(_bind(p, "on_response_chunk", p.instance.on_response_chunk, metrics)
                                 for p in attached if isinstance(p.instance, ResponseHook)),
        )
    return chains
