"""The tap's aiohttp application: built once per worker by :func:`create_app`.

Everything that can be decided at start-up is: plugins are loaded and
initialised, each LLM gets its frozen hook chain, plugin endpoints are routed,
one pooled upstream ``ClientSession`` is opened and the event publisher started.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway_tap.apps import AppIndex, presented_key
from gateway_tap.budgets.periods import Clock
from gateway_tap.plugins.chain import build_chains
from gateway_tap.plugins.endpoints import EndpointRoutes
from gateway_tap.plugins.loader import LoadedPlugin, close_plugins, load_plugins, plugins_health
from gateway_tap.plugins.services import ControlChannel
from gateway_tap.plugins.shared_kv import SharedKVStore
from gateway_tap.proxy import errors
from gateway_tap.proxy.bounds import MODEL_CHARS, clip
from gateway_tap.proxy.budget import BudgetGate, unenforced_report
from gateway_tap.proxy.client_address import ClientAddresses
from gateway_tap.proxy.endpoints import EndpointServer, endpoints_app
from gateway_tap.proxy.exchange import Exchange
from gateway_tap.proxy.guard import GUARD_KEY, RecordingGuard, exchange_of
from gateway_tap.proxy.handler import ProxyHandler
from gateway_tap.proxy.logs import access_log
from gateway_tap.proxy.metrics import TapMetrics
from gateway_tap.proxy.protocol import LIMITS_KEY, parser_limits
from gateway_tap.proxy.ratelimit import RateLimitGate
from gateway_tap.proxy.reload import ComposeFn, ConfigReloader, LoadFn
from gateway_tap.proxy.snapshot import ConfigSnapshot
from gateway_tap.proxy.upstream import Upstream
from gateway_tap.publisher import EventPublisher
from gateway_tap.redis_link import RedisLink
from gateway_tap.services import BudgetStatusFn, Gateway
from gateway_tap.settings import GatewayConfig, PluginConfig
from schemas import status_class, utc_now

log = logging.getLogger(__name__)

TAP_KEY = web.AppKey("gateway_tap", object)


class TapApp:
    """Holds the per-worker state; ``web_app`` is what aiohttp serves."""

    def __init__(self, config: GatewayConfig, publisher: EventPublisher, metrics: TapMetrics,
                 plugins: list[LoadedPlugin], upstreams: dict[str, Upstream], endpoints: EndpointRoutes, apps: AppIndex,
                 session: aiohttp.ClientSession, gateway: Gateway, budget: BudgetGate | None = None,
                 shared_kv: SharedKVStore | None = None, *, config_path: str | Path | None = None,
                 load: LoadFn | None = None, compose: ComposeFn | None = None,
                 ratelimit: RateLimitGate | None = None, redis: RedisLink | None = None) -> None:
        self.shared_kv = shared_kv
        self.ratelimit = ratelimit
        self.redis = redis
        self.publisher = publisher
        self.metrics = metrics
        self.session = session
        self.gateway = gateway
        self.budget = budget
        snapshot = ConfigSnapshot(0, config, plugins, upstreams, endpoints, apps)
        limits = config.tap.limits
        self.handler = ProxyHandler(snapshot, session, limits.max_body_bytes, self.record,
                                    body_timeout_s=limits.body_timeout_s)
        self.endpoint_server = EndpointServer(lambda: self.handler.snapshot, metrics, publisher.publish_wire)
        # Without load/compose (a hand-built TapApp) the configuration is fixed for the app's lifetime.
        self.reloader = ConfigReloader(self, config_path, load=load, compose=compose) \
            if load is not None and compose is not None else None
        self.started = False
        tap = config.tap
        self.web_app = web.Application(client_max_size=tap.limits.max_body_bytes,
                                       handler_args=parser_limits(tap.limits))
        self.web_app[TAP_KEY] = self
        self.web_app[LIMITS_KEY] = tap.limits
        self.guard = self.web_app[GUARD_KEY] = RecordingGuard(
            self.record_answer, tap.limits.max_body_bytes,
            ClientAddresses(tap.trusted_proxies) if tap.trusted_proxies else None)
        self._routes()
        self.web_app.on_startup.append(self._on_startup)
        self.web_app.on_cleanup.append(self._on_cleanup)

    @property
    def snapshot(self) -> ConfigSnapshot:
        """The runtime configuration in force (what a request starting now captures)."""
        return self.handler.snapshot

    @property
    def config(self) -> GatewayConfig:
        return self.handler.snapshot.config

    @property
    def plugins(self) -> list[LoadedPlugin]:
        return self.handler.snapshot.plugins

    @property
    def upstreams(self) -> dict[str, Upstream]:
        return self.handler.snapshot.upstreams

    @property
    def apps(self) -> AppIndex:
        return self.handler.snapshot.apps

    def _routes(self) -> None:
        router = self.web_app.router
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        router.add_get("/budget", self.budget_endpoint)
        router.add_route("*", r"/llm/{llm_id}/{rest:.*}", self.handler.handle)
        # Plugin endpoints, resolved per request from the snapshot (a reload may add some), in a sub-application
        # so that their response-start signal (the endpoint timeout) costs /llm/ requests nothing.
        self.web_app.add_subapp("/plugins", endpoints_app(self.endpoint_server))
        router.add_route("*", "/{tail:.*}", self.not_found)

    async def _on_startup(self, app: web.Application) -> None:
        if self.budget is not None:
            await self.budget.start()
        await self.publisher.start()
        if self.reloader is not None:
            await self.reloader.start()
        self.started = True

    async def _on_cleanup(self, app: web.Application) -> None:
        self.started = False
        if self.reloader is not None:
            await self.reloader.stop()  # closes replaced plugins still waiting for their last requests
        await close_plugins(self.plugins)  # before the publisher stops: a plugin's last control message goes out
        if self.shared_kv is not None:
            await self.shared_kv.close()
        await self.session.close()
        await self.publisher.stop()
        if self.budget is not None:
            await self.budget.stop()
        if self.ratelimit is not None:
            await self.ratelimit.close()
        if self.redis is not None:
            await self.redis.close()

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"}, 200)

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready when started, the publisher is, and every plugin with ``health()`` says so (``plugins``: each
        of those, ``"ok"`` or why not)."""
        health = await plugins_health(self.plugins)
        ready = self.started and self.publisher.ready and all(why is None for why in health.values())
        body: dict[str, Any] = {"ready": ready, "publisher": self.publisher.stats()}
        if health:
            body["plugins"] = {name: why or "ok" for name, why in health.items()}
        return _json(body, 200 if ready else 503)

    async def serve_metrics(self, host: str, port: int, *, reuse_port: bool = False) -> web.AppRunner:
        """Serve ``/metrics`` on a listener of its own (``tap.metrics``; the proxy's port has none: the metrics
        name every app and its spend). Returns its runner: ``cleanup()`` it after the tap's."""
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_endpoint)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
        return runner

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def budget_endpoint(self, request: web.Request) -> web.Response:
        """The calling app's budgets and its key's own (spend, limits, % used, period, reset time); same auth as
        ``/llm``."""
        ex = exchange_of(request)
        key = presented_key(request.headers)
        found = self.apps.identify(key) if key is not None else None
        if found is None:
            raise errors.missing_key() if key is None else errors.unknown_key()
        app, ex.key_hash, ex.key_id = found
        ex.app_id = app.id
        llm_id = request.query.get("llm_id") or None
        report = (self.budget.report(app.id, llm_id, ex.key_id) if self.budget is not None
                  else unenforced_report(app.id, llm_id, ex.key_id))
        return _json(report, 200)

    async def not_found(self, request: web.Request) -> web.Response:
        raise errors.not_found(request.path)

    def record(self, ex: Exchange, snap: ConfigSnapshot) -> None:
        """Metrics, the access log line and the three events for a finished request. Never raises into serving.

        ``snap`` is the snapshot the request ran with (its LLMs, apps and capture settings).
        """
        ex.recorded = True
        m = self.metrics
        now = utc_now()
        ex.settle_cost(now)
        up = snap.upstreams.get(ex.llm_id)
        llm = ex.llm_id if up is not None else "unknown"
        app = ex.app_id or "none"
        if app != "none" and app not in snap.apps.by_id:
            app = "other"  # ids an auth plugin invented: keep the label set bounded
        model = up.model_label(ex.model, now) if up is not None else "other"
        c = m.request_children(app, llm, model, status_class(ex.status))
        c.requests.inc()
        c.request_seconds.observe(ex.total_ms / 1000)
        upstream_ms = ex.upstream_ms
        if upstream_ms is not None:
            c.upstream_seconds.observe(upstream_ms / 1000)
            c.overhead_seconds.observe(max(0.0, ex.total_ms - upstream_ms) / 1000)
        if ex.ttfb is not None:
            c.ttfb_seconds.observe(ex.ttfb - (ex.upstream_start or ex.started))
        usage = ex.usage
        if usage is not None and usage.total_tokens:
            c.input_tokens.inc(usage.prompt_tokens)
            c.output_tokens.inc(usage.completion_tokens)
        if ex.cost:
            c.cost.inc(ex.cost)
        if ex.error is not None and ex.upstream_start is None:
            m.rejected_child(llm, ex.error.code).inc()
        if snap.access_log:
            fields = ex.access_fields(snap.redactor)
            fields["model"] = clip(ex.model, MODEL_CHARS)
            fields["upstream_ms"] = None if upstream_ms is None else round(upstream_ms, 3)
            access_log.info("request", extra=fields)
        events = ex.events(snap.gateway_id, capture_bodies=snap.capture_bodies, body_limit=snap.body_limit,
                           redactor=snap.redactor, now=now)
        if ex.budget is not None:
            BudgetGate.settle(ex, events)
        if ex.ratelimit is not None:
            RateLimitGate.settle(ex)
        publish = self.publisher.publish_wire
        for event in events:
            publish(event)

    def record_answer(self, ex: Exchange) -> None:
        """The access log line and the proxy_log of an answer that is no LLM call nor plugin endpoint call
        (``/budget``, an unknown route, a request the HTTP parser rejected...): see :mod:`.guard`."""
        ex.recorded = True
        snap = self.snapshot
        if ex.error is not None:
            self.metrics.rejected_child("none", ex.error.code).inc()
        if snap.access_log:
            access_log.info("request", extra=ex.access_fields(snap.redactor))
        self.publisher.publish_wire(ex.proxy_log(snap.gateway_id, redactor=snap.redactor))


def _json(data: Any, status: int) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def create_app(config: GatewayConfig, *, worker_index: int = 0, publisher: EventPublisher | None = None,
                     metrics: TapMetrics | None = None, budget_status: BudgetStatusFn | None = None,
                     budget_clock: Clock | None = None,
                     config_path: str | Path | None = None) -> TapApp:
    """Load plugins, compose the chains and wire everything for one worker.

    The publisher starts with the application (``on_startup``) and is drained on
    cleanup; its spool lives in ``<spool_dir>/worker-<worker_index>``. With
    ``budgets`` configured, the budget store is opened here and the enforcer
    refreshes from ``on_startup`` to cleanup; ``budget_clock`` replaces UTC now (tests).

    ``config_path`` is the file ``config`` came from: SIGHUP (:meth:`ConfigReloader.request`) and
    ``tap.reload.watch`` reload it.

    :raises gateway_tap.plugins.PluginLoadError: a plugin failed to load or initialise.
    """
    metrics = metrics or TapMetrics()
    kv_data: dict[str, tuple[Any, float | None]] = {}  # memory KV backing, kept across reloads
    apps = AppIndex(config.apps)
    # One Redis link per worker, for every user of it (connects on first use).
    redis = RedisLink(config.redis, registry=metrics.registry) if _uses_redis(config) else None
    ratelimit = RateLimitGate(config.rate_limits, config.rate_limiting, registry=metrics.registry, link=redis) \
        if RateLimitGate.wanted(config) else None
    budget = await BudgetGate.open(config, registry=metrics.registry, clock=budget_clock)
    gateway = Gateway(apps, budget_status or (budget.status_for if budget is not None else None), config.llms)
    settings = config.tap.publisher
    if publisher is None:
        publisher = EventPublisher(config.kafka, settings,
                                   spool_dir=Path(settings.spool_dir) / f"worker-{worker_index}",
                                   registry=metrics.registry)
    # Plugins may send control messages from initialize on: they queue until the publisher starts.
    control = ControlChannel(publisher, config.gateway_id, config.kafka.topic_prefix)
    # Opened on first use only, so a reload may add a plugin with kv.backend: shared.
    shared_kv = SharedKVStore(config.tap.shared_kv_path or Path(settings.spool_dir) / "plugin-kv.sqlite")

    async def load(settings: list[PluginConfig], previous: Sequence[LoadedPlugin] = ()) -> list[LoadedPlugin]:
        return await load_plugins(settings, gateway, control=control.send, shared_kv=shared_kv, previous=previous,
                                  kv_data=kv_data, redis=redis)

    try:
        plugins = await load(config.plugins)
    except BaseException:
        if budget is not None:
            await budget.stop()
        if redis is not None:
            await redis.close()
        raise
    budget_step = budget.step(metrics.hooks) if budget is not None else None
    ratelimit_step = ratelimit.step(metrics.hooks) if ratelimit is not None else None

    def compose(cfg: GatewayConfig, loaded: Sequence[LoadedPlugin]) -> tuple[dict[str, Upstream], EndpointRoutes]:
        # Rate limits before budgets on the same side: a request over its rate costs no budget reservation.
        placed = ((ratelimit_step, cfg.rate_limiting.position), (budget_step, cfg.budget_enforcement.position))
        before = [step for step, position in placed if step is not None and position == "before_plugins"]
        after = [step for step, position in placed if step is not None and position == "after_plugins"]
        # "*" (never an LLM id) is the chain of the plugins attached to every LLM: the gateway-wide auth hooks
        # that plugin endpoints authenticate with.
        chains = build_chains(loaded, [*(llm.id for llm in cfg.llms), "*"], metrics.hooks,
                              post_auth_before=before, post_auth_after=after)
        upstreams = {llm.id: Upstream.build(llm, chains[llm.id]) for llm in cfg.llms}
        return upstreams, EndpointRoutes(loaded, metrics.hooks, chains["*"].auth)

    upstreams, endpoints = compose(config, plugins)
    connector = aiohttp.TCPConnector(limit=config.tap.upstream_max_connections, ttl_dns_cache=300,
                                     enable_cleanup_closed=True)
    session = aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False,
                                    skip_auto_headers=("User-Agent",))
    return TapApp(config, publisher, metrics, plugins, upstreams, endpoints, apps, session, gateway, budget, shared_kv,
                  config_path=config_path, load=load, compose=compose, ratelimit=ratelimit, redis=redis)


def _uses_redis(config: GatewayConfig) -> bool:
    """Whether a worker of ``config`` needs the shared Redis (read at start: ``redis`` changes need a restart)."""
    return (RateLimitGate.wanted(config) and config.rate_limiting.mode == "shared") or any(
        p.enabled and p.kv.backend == "redis" for p in config.plugins)
