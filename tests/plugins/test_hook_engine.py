"""The hook engine's rules (gateway_tap.plugins.chain), unit-tested without a server.

The proxy and PluginHarness both run chains through these functions, so what holds here holds for both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from gateway_tap.apps import AppIndex
from gateway_tap.hooks import HookContext, HookResult, Identity, PluginServices, StreamEvent, TapRequest, TapResponse
from gateway_tap.plugins.chain import (
    Answered,
    HookFailed,
    HookMetrics,
    PluginHook,
    RequestScope,
    Stopped,
    build_chains,
    parse_request_json,
    run_auth_hooks,
    run_body_hooks,
    run_chunk_hooks,
    run_event_hooks,
    run_request_hooks,
    run_response_header_hooks,
)
from gateway_tap.plugins.loader import LoadedPlugin
from gateway_tap.services import Gateway, MemoryKV
from gateway_tap.settings import PluginConfig

SERVICES = PluginServices(MemoryKV({}, "t"), logging.getLogger("test"), Gateway(AppIndex([])))


def _hook(name: str, hook: str, fn: Any, *, fail_open: bool = False, timeout_s: float = 1.0,
          metrics: HookMetrics | None = None) -> PluginHook:
    return PluginHook(name, hook, fn, config={"c": 1}, services=SERVICES, timeout_s=timeout_s, fail_open=fail_open,
                      metrics=metrics or HookMetrics(CollectorRegistry()))


def _request(body: bytes = b'{"model": "m"}') -> TapRequest:
    return TapRequest("POST", "v1/chat/completions", "", CIMultiDict({"content-type": "application/json"}), body)


def _scope() -> RequestScope:
    return RequestScope("req_1", "openai", "openai")


async def test_modify_applies_headers_body_and_metadata_then_continues() -> None:
    seen: list[bytes] = []

    async def first(req: TapRequest, ctx: HookContext) -> HookResult:
        return HookResult.modify(headers={"x-a": "1"}, body=b'{"model": "n"}', metadata={"k": "v"})

    async def second(req: TapRequest, ctx: HookContext) -> None:
        seen.append(req.body)
        assert ctx.metadata == {"k": "v"} and req.headers["x-a"] == "1"

    req, scope = _request(), _scope()
    assert await run_request_hooks([_hook("a", "post_auth", first), _hook("b", "post_auth", second)], req,
                                   scope) is None
    assert seen == [b'{"model": "n"}'] and req.json() == {"model": "n"} and scope.metadata == {"k": "v"}


async def test_stop_ends_the_stage_and_names_the_plugin() -> None:
    ran: list[str] = []

    async def stopper(req: TapRequest, ctx: HookContext) -> HookResult:
        ran.append("stopper")
        return HookResult.stop(403, "no", code="nope")

    async def later(req: TapRequest, ctx: HookContext) -> None:
        ran.append("later")

    with pytest.raises(Stopped) as stopped:
        await run_request_hooks([_hook("guard", "pre_auth", stopper), _hook("x", "pre_auth", later)], _request(),
                                _scope())
    assert (stopped.value.plugin, stopped.value.result.status, stopped.value.result.code) == ("guard", 403, "nope")
    assert ran == ["stopper"]


async def test_respond_answers_instead_of_the_upstream() -> None:
    async def cache(req: TapRequest, ctx: HookContext) -> HookResult:
        return HookResult.respond(200, b"{}", cache_hit=True, charge=False)

    async def later(req: TapRequest, ctx: HookContext) -> None:
        raise AssertionError("a later hook ran after a respond")

    answered = await run_request_hooks([_hook("cache", "post_auth", cache), _hook("x", "post_auth", later)],
                                       _request(), _scope())
    assert isinstance(answered, Answered) and answered.plugin == "cache"
    assert answered.result.cache_hit and not answered.result.charge and answered.result.body == b"{}"


async def _boom(arg: Any, ctx: HookContext) -> None:
    raise RuntimeError("boom")


async def _slow(arg: Any, ctx: HookContext) -> None:
    await asyncio.sleep(5)


async def _wrong_type(arg: Any, ctx: HookContext) -> Any:
    return "not a HookResult"


@pytest.mark.parametrize(("fn", "kind", "reason"), [
    (_boom, "exception", "RuntimeError('boom')"),
    (_slow, "timeout", "timed out after 20 ms"),
    (_wrong_type, "exception", "returned str, expected HookResult or None"),
])
async def test_failures_follow_on_error(fn: Any, kind: str, reason: str) -> None:
    registry = CollectorRegistry()
    metrics = HookMetrics(registry)
    closed = _hook("closed", "post_auth", fn, timeout_s=0.02, metrics=metrics)
    with pytest.raises(HookFailed) as failed:
        await run_request_hooks([closed], _request(), _scope())
    assert (failed.value.plugin, failed.value.hook, failed.value.reason) == ("closed", "post_auth", reason)
    assert failed.value.timed_out is (kind == "timeout")

    after: list[str] = []

    async def later(req: TapRequest, ctx: HookContext) -> None:
        after.append("ran")

    opened = _hook("open", "post_auth", fn, timeout_s=0.02, fail_open=True, metrics=metrics)
    assert await run_request_hooks([opened, _hook("later", "post_auth", later)], _request(), _scope()) is None
    assert after == ["ran"]  # the failed hook was skipped, the chain went on
    for plugin in ("closed", "open"):
        assert registry.get_sample_value("gateway_tap_hook_errors_total",
                                         {"plugin": plugin, "hook": "post_auth", "kind": kind}) == 1.0
        assert registry.get_sample_value("gateway_tap_hook_duration_seconds_count",
                                         {"plugin": plugin, "hook": "post_auth"}) == 1.0


async def test_auth_first_identity_wins_none_defers_stop_rejects() -> None:
    async def defer(req: TapRequest, ctx: HookContext) -> None:
        return None

    async def alice(req: TapRequest, ctx: HookContext) -> Identity:
        return Identity("app-a", "alice")

    async def bob(req: TapRequest, ctx: HookContext) -> Identity:
        return Identity("app-b", "bob")

    async def reject(req: TapRequest, ctx: HookContext) -> HookResult:
        return HookResult.stop(401, "banned", code="banned")

    scope = _scope()
    who = await run_auth_hooks([_hook("d", "authenticate", defer), _hook("a", "authenticate", alice),
                                _hook("b", "authenticate", bob)], _request(), scope)
    assert who == Identity("app-a", "alice") and (scope.app_id, scope.user_id) == ("app-a", "alice")
    assert await run_auth_hooks([_hook("d", "authenticate", defer)], _request(), _scope()) is None
    with pytest.raises(Stopped) as stopped:
        await run_auth_hooks([_hook("r", "authenticate", reject), _hook("a", "authenticate", alice)], _request(),
                             _scope())
    assert stopped.value.plugin == "r"


async def test_response_headers_modify_and_stop() -> None:
    async def stamp(resp: TapResponse, ctx: HookContext) -> HookResult:
        resp.status = 201
        return HookResult.modify(headers={"x-stamp": "1"}, metadata={"seen": "yes"})

    async def veto(resp: TapResponse, ctx: HookContext) -> HookResult:
        return HookResult.stop(502, "upstream says no")

    resp, scope = TapResponse(200, CIMultiDict(), False), _scope()
    await run_response_header_hooks([_hook("s", "on_response_headers", stamp)], resp, scope)
    assert (resp.status, resp.headers["x-stamp"], scope.metadata) == (201, "1", {"seen": "yes"})
    with pytest.raises(Stopped) as stopped:
        await run_response_header_hooks([_hook("s", "on_response_headers", stamp),
                                         _hook("v", "on_response_headers", veto)], resp, scope)
    assert (stopped.value.plugin, stopped.value.result.status) == ("v", 502)


async def test_chunk_hooks_chain_and_drop() -> None:
    async def upper(chunk: bytes, ctx: HookContext) -> bytes:
        return chunk.upper()

    async def drop_x(chunk: bytes, ctx: HookContext) -> bytes:
        return b"" if chunk == b"X" else chunk + b"!"

    steps = [_hook("u", "on_response_chunk", upper), _hook("d", "on_response_chunk", drop_x)]
    assert await run_chunk_hooks(steps, b"ab", _scope()) == b"AB!"
    assert await run_chunk_hooks(steps, b"x", _scope()) == b""
    bad = _hook("bad", "on_response_chunk", _wrong_type, fail_open=True)
    assert await run_chunk_hooks([bad, *steps], b"ab", _scope()) == b"AB!"  # the bad result is skipped


async def test_plugin_state_is_per_plugin_and_per_request() -> None:
    async def count(req: TapRequest, ctx: HookContext) -> None:
        ctx.state["n"] = ctx.state.get("n", 0) + 1

    a, b = _hook("a", "pre_auth", count), _hook("b", "pre_auth", count)
    scope = _scope()
    await run_request_hooks([a, b, a], _request(), scope)
    assert scope.plugin_states == {"a": {"n": 2}, "b": {"n": 1}}
    other = _scope()
    await run_request_hooks([a], _request(), other)
    assert other.plugin_states == {"a": {"n": 1}}


def test_parse_request_json_reads_the_model_only_from_json_posts() -> None:
    scope = _scope()
    assert parse_request_json(_request(b'{"model": "gpt-x", "stream": true}'), scope) == {"model": "gpt-x",
                                                                                          "stream": True}
    assert scope.model == "gpt-x"
    get = TapRequest("GET", "v1/models", "", CIMultiDict(), b'{"model": "nope"}')
    other = _scope()
    assert parse_request_json(get, other) is None and other.model is None
    text = TapRequest("POST", "p", "", CIMultiDict({"content-type": "text/plain"}), b"not json")
    assert parse_request_json(text, _scope()) is None


class _Both:
    async def pre_auth(self, request: TapRequest, ctx: HookContext) -> None: ...

    async def on_response_headers(self, response: TapResponse, ctx: HookContext) -> None: ...

    async def on_response_chunk(self, chunk: bytes, ctx: HookContext) -> bytes:
        return chunk


class _PostOnly:
    async def post_auth(self, request: TapRequest, ctx: HookContext) -> None: ...


class _Builtin:
    name = "builtin"

    async def run(self, arg: Any, scope: RequestScope) -> None: ...


def _loaded(name: str, instance: Any, llms: list[str]) -> LoadedPlugin:
    settings = PluginConfig.model_validate({"name": name, "use": "x:Y", "llms": llms, "on_error": "fail_open",
                                            "timeout_ms": 250})
    return LoadedPlugin(settings, instance, SERVICES)


def test_build_chains_by_capability_attachment_and_builtin_position() -> None:
    before, after = _Builtin(), _Builtin()
    plugins = [_loaded("both", _Both(), ["*"]), _loaded("post", _PostOnly(), ["anthropic"]),
               _loaded("post2", _PostOnly(), ["*"])]
    chains = build_chains(plugins, ["openai", "anthropic"], HookMetrics(CollectorRegistry()),
                          post_auth_before=[before], post_auth_after=[after])
    openai, anthropic = chains["openai"], chains["anthropic"]
    assert [s.name for s in openai.pre_auth] == ["both"] and openai.auth == ()
    assert [s.name for s in openai.response_headers] == ["both"] == [s.name for s in openai.response_chunk]
    assert openai.post_auth[0] is before and openai.post_auth[-1] is after
    assert [s.name for s in openai.post_auth] == ["builtin", "post2", "builtin"]
    assert [s.name for s in anthropic.post_auth] == ["builtin", "post", "post2", "builtin"]
    hook = anthropic.post_auth[1]
    assert isinstance(hook, PluginHook)
    assert (hook.hook, hook.timeout_s, hook.fail_open) == ("post_auth", 0.25, True)


async def test_body_hooks_modify_then_stop() -> None:
    async def shorten(pair: Any, ctx: HookContext) -> HookResult:
        response, body = pair
        response.status = 203
        return HookResult.modify(body=body[:2], headers={"x-cut": "1"})

    async def veto(pair: Any, ctx: HookContext) -> HookResult | None:
        return HookResult.stop(403, "blocked", code="content_blocked") if pair[1] == b"no" else None

    resp = TapResponse(200, CIMultiDict(), False)
    steps = [_hook("s", "on_response_body", shorten), _hook("v", "on_response_body", veto)]
    assert await run_body_hooks(steps, resp, b"okay", _scope()) == b"ok"
    assert (resp.status, resp.headers["x-cut"]) == (203, "1")
    with pytest.raises(Stopped) as stopped:
        await run_body_hooks(steps, TapResponse(200, CIMultiDict(), False), b"nope", _scope())
    assert (stopped.value.plugin, stopped.value.code, stopped.value.error_type) == ("v", "content_blocked",
                                                                                  "permission_error")


async def test_event_hooks_replace_drop_and_stop_in_order() -> None:
    seen: list[str] = []

    async def replace(event: StreamEvent, ctx: HookContext) -> StreamEvent | HookResult | None:
        seen.append(f"replace:{event.data}")
        if event.data == "drop-me":
            return HookResult.drop()
        if event.data == "stop-me":
            return HookResult.stop(403, "no")
        return StreamEvent(event.data.upper())

    async def after(event: StreamEvent, ctx: HookContext) -> None:
        seen.append(f"after:{event.data}")

    steps = [_hook("r", "on_stream_event", replace), _hook("a", "on_stream_event", after)]
    out = await run_event_hooks(steps, StreamEvent("hi"), _scope())
    assert out is not None and out.data == "HI" and out.raw is None
    assert await run_event_hooks(steps, StreamEvent("drop-me"), _scope()) is None
    with pytest.raises(Stopped):
        await run_event_hooks(steps, StreamEvent("stop-me"), _scope())
    assert seen == ["replace:hi", "after:HI", "replace:drop-me", "replace:stop-me"]


async def test_a_hook_that_waits_runs_to_its_result_under_its_timeout() -> None:
    async def waits_then_modifies(req: TapRequest, ctx: HookContext) -> HookResult:
        for _ in range(3):
            await asyncio.sleep(0.001)
        return HookResult.modify(metadata={"waited": "yes"})

    async def waits_then_raises(req: TapRequest, ctx: HookContext) -> None:
        await asyncio.sleep(0.001)
        raise ValueError("late")

    scope = _scope()
    await run_request_hooks([_hook("w", "post_auth", waits_then_modifies)], _request(), scope)
    assert scope.metadata == {"waited": "yes"}
    with pytest.raises(HookFailed, match="ValueError"):
        await run_request_hooks([_hook("r", "post_auth", waits_then_raises)], _request(), _scope())


async def test_the_timeout_counts_from_the_call_not_from_the_first_wait() -> None:
    import time as clock

    async def busy_then_waits(req: TapRequest, ctx: HookContext) -> None:
        end = clock.perf_counter() + 0.05
        while clock.perf_counter() < end:  # 50 ms of work before it ever yields
            pass
        await asyncio.sleep(0.04)  # would fit a fresh 80 ms timeout, not what is left of it

    with pytest.raises(HookFailed) as failed:
        await run_request_hooks([_hook("b", "post_auth", busy_then_waits, timeout_s=0.08)], _request(), _scope())
    assert failed.value.timed_out


async def test_cancelling_the_request_cancels_a_waiting_hook() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def waits(req: TapRequest, ctx: HookContext) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(run_request_hooks([_hook("w", "post_auth", waits)], _request(), _scope()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()  # not swallowed as a hook failure, and the hook saw it
