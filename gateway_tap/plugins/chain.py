"""The hook engine: one chain per LLM, composed once at start-up, and the one place its rules live.

A chain is a tuple of :class:`Step` per stage. A step is either a plugin's hook
(:class:`PluginHook`: the plugin's timeout, ``on_error`` and metrics applied around
the call) or a built-in gateway step (budget enforcement) implementing the same
:class:`Step` protocol. The rules, which the proxy and ``PluginHarness`` both get
from the ``run_*`` functions below and never re-implement:

- steps run in chain order (plugins by ``order``, then file order; built-in post-auth
  steps before or after the plugins' as configured); a stop ends the stage at once;
- a plugin hook that raises, times out (also by running past its timeout without yielding,
  which blocked the event loop) or returns something its stage does not accept is skipped
  when it is ``fail_open`` and raises :class:`HookFailed` when it is ``fail_closed``;
- ``None`` / :meth:`HookResult.proceed` continue; :meth:`HookResult.modify` sets the
  headers, replaces the body and adds the metadata, then continues;
  :meth:`HookResult.stop` raises :class:`Stopped`; :meth:`HookResult.respond` (request
  stages) ends the stage with an answer that replaces the upstream call;
- auth: the first :class:`Identity` wins, a stop rejects, ``None`` defers to the next
  auth hook and finally to the caller's built-in key check;
- a body hook (whole non-streamed body, before anything is sent) continues, modifies the body and
  headers, or stops: the client then gets the stop's error instead of the answer;
- a stream event hook passes, rewrites (in place or by returning an event) or drops
  (:meth:`HookResult.drop`) each parsed server-sent event, or stops: the caller ends the stream
  with an error event;
- a chunk hook returns the bytes to send (``b""`` drops the chunk); at the end of a body each chunk
  hook's plugin with ``on_response_end`` returns what it held back, which the chunk hooks after it
  see like any chunk (:func:`run_chunk_end`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import types
from collections.abc import Callable, Coroutine, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway_tap.fast_metrics import FastCounter, FastHistogram
from gateway_tap.hooks import (
    NO_CLAIMS,
    AuthHook,
    HookContext,
    HookResult,
    Identity,
    PluginServices,
    PostAuthHook,
    PreAuthHook,
    ResponseBodyHook,
    ResponseChunkHook,
    ResponseEndHook,
    ResponseHeadersHook,
    StreamEvent,
    StreamEventHook,
    TapRequest,
    TapResponse,
)
from gateway_tap.plugins.loader import LoadedPlugin
from gateway_tap.tracing import TraceContext, start_trace

log = logging.getLogger(__name__)

SKIPPED: Any = object()
"""Returned by :meth:`PluginHook.run` when a fail-open hook failed: act as if it had not run."""

# 100 µs resolves a hook and the tap's own overhead; 120 s covers long (streamed) LLM calls. The tap's request
# histograms use the same buckets, so hook latency and request latency read on one scale.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0)


class HookMetrics:
    """``gateway_tap_hook_*``: latency and failures per plugin and hook (built-in steps included)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram("gateway_tap_hook_duration_seconds", "Latency of each plugin hook.",
                                 ["plugin", "hook"], buckets=LATENCY_BUCKETS, registry=registry)
        self.errors = Counter("gateway_tap_hook_errors", "Hook exceptions and timeouts.",
                              ["plugin", "hook", "kind"], registry=registry)


class RequestScope:
    """What the chain knows about one request in flight; every hook context is built from it.

    The tap's per-request ``Exchange`` extends it; ``PluginHarness`` uses it as it is.
    ``metadata`` is shared by every hook of the request (it ends up in the events);
    ``plugin_states`` holds each plugin's own per-request ``ctx.state``; ``claims`` the identifying
    auth hook's :attr:`Identity.claims`; ``trace`` the request's span (a new trace unless given).
    """

    __slots__ = ("app_id", "claims", "llm_id", "metadata", "model", "plugin_states", "request_id", "trace",
                 "user_id", "vendor")

    def __init__(self, request_id: str, llm_id: str, vendor: str = "unknown",
                 trace: TraceContext | None = None) -> None:
        self.request_id = request_id
        self.trace = trace if trace is not None else start_trace()
        self.llm_id = llm_id
        self.vendor = vendor
        self.app_id: str | None = None
        self.user_id: str | None = None
        self.claims: Mapping[str, Any] = NO_CLAIMS
        self.model: str | None = None
        self.metadata: dict[str, str] = {}
        self.plugin_states: dict[str, dict[str, Any]] = {}


class HookFailed(Exception):
    """A fail-closed hook raised, timed out or returned something its stage does not accept."""

    def __init__(self, plugin: str, hook: str, reason: str, timed_out: bool) -> None:
        super().__init__(f"{plugin}.{hook}: {reason}")
        self.plugin = plugin
        self.hook = hook
        self.reason = reason
        self.timed_out = timed_out


class Stopped(Exception):
    """A hook ended the request with :meth:`HookResult.stop`; ``plugin`` names it (``blocked_by``).

    ``error_type``, ``code`` and ``message`` are what the client's error says (JSON body or final stream event).
    """

    def __init__(self, result: HookResult, plugin: str) -> None:
        super().__init__(f"stopped by {plugin}: {result.status} {result.message}")
        self.result = result
        self.plugin = plugin

    @property
    def error_type(self) -> str:
        status = self.result.status
        return "permission_error" if status == 403 else "plugin_error" if status >= 500 else "invalid_request_error"

    @property
    def code(self) -> str:
        return self.result.code or "blocked_by_plugin"

    @property
    def message(self) -> str:
        return self.result.message or f"request stopped by plugin {self.plugin!r}"


@dataclass(frozen=True, slots=True)
class Answered:
    """A step answered the request itself (:meth:`HookResult.respond`) instead of the upstream."""

    result: HookResult
    plugin: str


class Step(Protocol):
    """One link of a chain: a plugin's hook or a built-in gateway step.

    ``run`` gets the stage's argument (the request, the response, or a body chunk) and the
    request's scope, and returns what a hook of that stage returns (or :data:`SKIPPED`).
    A built-in step may raise its own error to answer the request.
    """

    @property
    def name(self) -> str:
        """The plugin (or built-in step) name: ``blocked_by`` and the metric label."""
        ...

    async def run(self, arg: Any, scope: RequestScope) -> Any: ...


_ACCEPTS: dict[str, tuple[type, ...]] = {
    "pre_auth": (HookResult, type(None)),
    "authenticate": (Identity, HookResult, type(None)),
    "post_auth": (HookResult, type(None)),
    "on_response_headers": (HookResult, type(None)),
    "on_response_body": (HookResult, type(None)),
    "on_stream_event": (StreamEvent, HookResult, type(None)),
    "on_response_chunk": (bytes, bytearray),
    "on_response_end": (bytes, bytearray),
}
"""What each hook may return; anything else is the plugin's failure, handled by its ``on_error``."""


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Go on driving ``coro``, already started and suspended on ``yielded``, from the awaiting task.

    What ``await`` does for a coroutine that has not started yet: every future it waits on is handed
    to the task, every value or exception the task sends back is passed in, and its result returned.
    """
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(value)
            except StopIteration as done:
                return done.value


def blocked_past_timeout(elapsed_s: float, timeout_s: float) -> str | None:
    """Why a plugin's call that returned after ``elapsed_s`` is a timeout although no timer interrupted it, or None.

    A timer only fires when the call gives the event loop back; a call that ran past its timeout without doing so
    (``time.sleep``, a synchronous client) blocked every request of the worker meanwhile, and is held to its
    ``timeout_ms`` all the same: its result is discarded. The one rule of hooks and plugin endpoints.
    """
    if elapsed_s <= timeout_s:
        return None
    return (f"ran {elapsed_s * 1000:.0f} ms, past its {timeout_s * 1000:.0f} ms timeout, without giving the event "
            "loop back: every request of this worker waited; run blocking work with asyncio.to_thread")


class PluginHook:
    """One plugin's hook with its policy and metric children resolved up front."""

    __slots__ = ("_accepts", "_errors", "_latency", "config", "fail_open", "fn", "hook", "name", "services",
                 "timeout_s")

    def __init__(self, plugin: str, hook: str, fn: Callable[..., Coroutine[Any, Any, Any]], *,
                 config: Mapping[str, Any],
                 services: PluginServices, timeout_s: float, fail_open: bool, metrics: HookMetrics) -> None:
        self.name = plugin
        self.hook = hook
        self.fn = fn
        self.config = config
        self.services = services
        self.timeout_s = timeout_s
        self.fail_open = fail_open
        self._accepts = _ACCEPTS[hook]
        self._latency = FastHistogram(metrics.seconds.labels(plugin, hook))
        self._errors = {kind: FastCounter(metrics.errors.labels(plugin, hook, kind))
                        for kind in ("exception", "timeout")}

    def context(self, scope: RequestScope) -> HookContext:
        state = scope.plugin_states.get(self.name)
        if state is None:
            state = scope.plugin_states[self.name] = {}
        return HookContext(scope.request_id, scope.llm_id, scope.vendor, self.name, self.config, self.services,
                           scope.metadata, scope.app_id, scope.user_id, scope.model, state, scope.claims,
                           scope.trace.trace_id, scope.trace.traceparent)

    async def run(self, arg: Any, scope: RequestScope) -> Any:
        """The hook's result on ``arg``; :data:`SKIPPED` when a fail-open hook failed.

        The hook runs eagerly: most hooks return without ever waiting, and those pay no timer. A hook
        that suspends finishes under its timeout, counted from the call. A call that ran past its timeout
        without yielding (it blocked the event loop, so no timer could interrupt it: ``time.sleep``, a
        synchronous client) is a timeout too: its result is discarded.

        :raises HookFailed: a fail-closed hook raised, exceeded its timeout or returned a wrong type.
        """
        start = time.perf_counter()
        try:
            coro = self.fn(arg, self.context(scope))
            try:
                result = coro.send(None)
            except StopIteration as done:
                result = done.value
            else:
                deadline = asyncio.get_running_loop().time() + self.timeout_s - (time.perf_counter() - start)
                async with asyncio.timeout_at(deadline):
                    result = await _resume(coro, result)
        except TimeoutError:
            return self._failed(scope, "timeout", f"timed out after {self.timeout_s * 1000:.0f} ms")
        except Exception as exc:
            return self._failed(scope, "exception", repr(exc))
        finally:
            elapsed = time.perf_counter() - start
            self._latency.observe(elapsed)
        blocked = blocked_past_timeout(elapsed, self.timeout_s)
        if blocked is not None:
            return self._failed(scope, "timeout", blocked)
        if not isinstance(result, self._accepts):
            expected = " or ".join("None" if t is type(None) else t.__name__ for t in self._accepts)
            return self._failed(scope, "exception", f"returned {type(result).__name__}, expected {expected}")
        return result

    def _failed(self, scope: RequestScope, kind: str, reason: str) -> Any:
        self._errors[kind].inc()
        log.warning("hook failed", extra={"plugin": self.name, "hook": self.hook, "request_id": scope.request_id,
                                          "reason": reason, "on_error": "fail_open" if self.fail_open else
                                          "fail_closed"})
        if self.fail_open:
            return SKIPPED
        raise HookFailed(self.name, self.hook, reason, kind == "timeout")


# -- running a chain: the rules, once ------------------------------------------------------------------------

async def run_request_hooks(steps: Sequence[Step], request: TapRequest, scope: RequestScope) -> Answered | None:
    """Pre-auth or post-auth: run ``steps`` on ``request`` in order, applying what each decided.

    :returns: the answer of a step that responded itself (the stage ends there), else None.
    :raises Stopped: a step stopped the request.
    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run(request, scope)
        if result is None or result is SKIPPED:
            continue
        if result.action == "stop":
            raise Stopped(result, step.name)
        if result.action == "respond":
            return Answered(result, step.name)
        if result.headers:
            request.headers.update(result.headers)
        if result.body is not None:
            request.body = result.body
        if result.metadata:
            scope.metadata.update(result.metadata)
    return None


async def run_auth_hooks(steps: Sequence[Step], request: TapRequest, scope: RequestScope) -> Identity | None:
    """The first :class:`Identity` an auth hook returns (set on ``scope``), or None: every hook deferred and the
    caller's built-in key check decides.

    :raises Stopped: an auth hook rejected the request.
    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run(request, scope)
        if isinstance(result, Identity):
            scope.app_id, scope.user_id, scope.claims = result.app_id, result.user_id, result.claims
            return result
        if isinstance(result, HookResult) and result.action == "stop":
            raise Stopped(result, step.name)
    return None


async def run_response_header_hooks(steps: Sequence[Step], response: TapResponse, scope: RequestScope) -> None:
    """Response headers, before anything is sent: status and headers may change in place or by ``modify``.

    :raises Stopped: a hook replaces the response with its stop result.
    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run(response, scope)
        if result is None or result is SKIPPED:
            continue
        if result.action == "stop":
            raise Stopped(result, step.name)
        if result.headers:
            response.headers.update(result.headers)
        if result.metadata:
            scope.metadata.update(result.metadata)


async def run_body_hooks(steps: Sequence[Step], response: TapResponse, body: bytes, scope: RequestScope) -> bytes:
    """A whole non-streamed body, before anything is sent: the body to send after every body hook ran.

    :raises Stopped: a hook replaces the answer with its stop result.
    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run((response, body), scope)
        if result is None or result is SKIPPED:
            continue
        if result.action == "stop":
            raise Stopped(result, step.name)
        if result.headers:
            response.headers.update(result.headers)
        if result.body is not None:
            body = result.body
        if result.metadata:
            scope.metadata.update(result.metadata)
    return body


async def run_event_hooks(steps: Sequence[Step], event: StreamEvent, scope: RequestScope) -> StreamEvent | None:
    """The event to send instead of ``event`` after every stream event hook ran on it; None: send nothing.

    :raises Stopped: a hook ends the stream (the caller sends the error event).
    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run(event, scope)
        if result is None or result is SKIPPED:
            continue
        if isinstance(result, StreamEvent):
            event = result
        elif result.action == "drop":
            return None
        elif result.action == "stop":
            raise Stopped(result, step.name)
        elif result.metadata:
            scope.metadata.update(result.metadata)
    return event


async def run_chunk_hooks(steps: Sequence[Step], chunk: bytes, scope: RequestScope) -> bytes:
    """The bytes to write instead of ``chunk`` (``b""``: nothing) after every chunk hook ran on it.

    :raises HookFailed: a fail-closed hook failed.
    """
    for step in steps:
        result = await step.run(chunk, scope)
        if result is not SKIPPED:
            chunk = result
    return chunk


async def run_chunk_end(steps: Sequence[Step], ends: Sequence[Step | None], scope: RequestScope) -> bytes:
    """The end of a body: the bytes to write last (``b""``: nothing).

    ``ends[i]`` is the ``on_response_end`` of the plugin of chunk hook ``steps[i]`` (None without one). In
    chain order, what the earlier hooks flushed goes through chunk hook ``i`` like any chunk, then hook
    ``i``'s own end adds what it held back: every chunk hook sees every byte once, in order.

    :raises HookFailed: a fail-closed hook failed.
    """
    out = b""
    for step, end in zip(steps, ends, strict=True):
        if out:
            result = await step.run(out, scope)
            if result is not SKIPPED:
                out = result
        if end is not None:
            held = await end.run(b"", scope)
            if held is not SKIPPED:
                out += held
    return out


def parse_request_json(request: TapRequest, scope: RequestScope) -> Any:
    """The JSON body of a POST that declares JSON (else None), setting ``scope.model`` from its ``model``.

    :raises orjson.JSONDecodeError: the body is not JSON.
    """
    if not request.body or request.method != "POST" or "json" not in request.headers.get("content-type", "json"):
        return None
    parsed = request.json()
    if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
        scope.model = parsed["model"]
    return parsed


# -- composing chains -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Chain:
    """The steps of one LLM, per stage, in run order."""

    pre_auth: tuple[Step, ...] = ()
    auth: tuple[Step, ...] = ()
    post_auth: tuple[Step, ...] = ()
    response_headers: tuple[Step, ...] = ()
    response_body: tuple[Step, ...] = ()
    stream_event: tuple[Step, ...] = ()
    response_chunk: tuple[Step, ...] = ()
    response_end: tuple[Step | None, ...] = ()
    """Empty when no chunk hook's plugin has ``on_response_end``; else one per ``response_chunk`` step: its
    plugin's end hook, or None (:func:`run_chunk_end`)."""


def _attached(plugin: LoadedPlugin, llm_id: str) -> bool:
    return "*" in plugin.settings.llms or llm_id in plugin.settings.llms


def _bind(plugin: LoadedPlugin, hook: str, metrics: HookMetrics) -> PluginHook:
    s = plugin.settings
    fn = getattr(plugin.instance, hook)
    if hook == "on_response_body":  # the one hook with two arguments: run_body_hooks passes (response, body)
        method = fn

        async def fn(pair: tuple[TapResponse, bytes], ctx: HookContext) -> Any:
            return await method(pair[0], pair[1], ctx)
    elif hook == "on_response_end":  # the one hook without an argument
        method = fn

        async def fn(_: bytes, ctx: HookContext) -> Any:
            return await method(ctx)

    return PluginHook(s.name, hook, fn, config=s.config, services=plugin.services, timeout_s=s.timeout_ms / 1000,
                      fail_open=s.on_error == "fail_open", metrics=metrics)


def build_chains(plugins: Sequence[LoadedPlugin], llm_ids: Iterable[str], metrics: HookMetrics, *,
                 post_auth_before: Sequence[Step] = (), post_auth_after: Sequence[Step] = ()) -> dict[str, Chain]:
    """One frozen :class:`Chain` per LLM id. ``plugins`` are already in run order.

    ``post_auth_before`` / ``post_auth_after`` are the gateway's own post-auth steps (budget
    enforcement, ``budget_enforcement.position``): they run on every LLM, before or after the
    plugins' post-auth hooks.
    """
    chains = {}
    for llm_id in llm_ids:
        attached = [p for p in plugins if _attached(p, llm_id)]

        def bound(capability: type, hook: str, attached: list[LoadedPlugin] = attached) -> tuple[PluginHook, ...]:
            return tuple(_bind(p, hook, metrics) for p in attached if isinstance(p.instance, capability))

        chunked = [p for p in attached if isinstance(p.instance, ResponseChunkHook)]
        ends = tuple(_bind(p, "on_response_end", metrics) if isinstance(p.instance, ResponseEndHook) else None
                     for p in chunked)
        chains[llm_id] = Chain(
            pre_auth=bound(PreAuthHook, "pre_auth"),
            auth=bound(AuthHook, "authenticate"),
            post_auth=(*post_auth_before, *bound(PostAuthHook, "post_auth"), *post_auth_after),
            response_headers=bound(ResponseHeadersHook, "on_response_headers"),
            response_body=bound(ResponseBodyHook, "on_response_body"),
            stream_event=bound(StreamEventHook, "on_stream_event"),
            response_chunk=bound(ResponseChunkHook, "on_response_chunk"),
            response_end=ends if any(e is not None for e in ends) else (),
        )
    return chains
