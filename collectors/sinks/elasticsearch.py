"""The built-in ``elasticsearch`` collector: every event type into daily indices.

Each batch is turned straight into ndjson bulk bodies (no intermediate client helper;
``_source`` is the event's Kafka value with the derived fields spliced in, so nothing is
serialised twice), cut into requests of at most ``bulk_max_events`` events / ``bulk_max_bytes``
bytes, and sent with up to ``bulk_concurrency`` requests in flight. ``_id`` is the event
id, so a redelivered batch overwrites instead of duplicating.

Outcome of one batch (the runtime commits only after the handler returns):

- every item 2xx: return;
- items answered 429 or 5xx (or their whole request answered so, or unreachable): :class:`RetryLater`
  with ``pending`` = those items only (and ``rejected`` = the 400s), so the runtime resends only them,
  with its own backoff (``collectors.<NAME>.retry``); the sink never sleeps or retries itself;
- items answered 400 (mapping/parse error): :class:`BadEvents` with the server's reason,
  once every other event of the batch is indexed;
- cluster unreachable, timeout, or any other refusal (401/403/404...): :class:`RetryLater`
  with a reason naming what to change; nothing is dead-lettered for a cluster problem.

Index names, mappings and templates live in :mod:`collectors.sinks.es_templates`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from elasticsearch import (
    ApiError,
    AsyncElasticsearch,
    ConnectionError,
    ConnectionTimeout,
    TransportError,
)
from elasticsearch.serializer import OrjsonSerializer
from pydantic import Field

from collectors.config import parse_collector_config
from collectors.sdk import BadEvents, CollectorServices, ConfigError, DataCollector, RetryLater
from collectors.sinks import es_templates as tpl
from gateway_tap.settings import Section
from schemas.events import EVENT_TYPES, Analytics, BudgetUsage, Event, EventType, ProxyLog, status_class


class EsConfig(Section):
    """The ``elasticsearch`` collector's config."""

    renamed_keys = {"request_timeout": "request_timeout_s",
                    # Retries belong to the runtime now: one set of settings per collector.
                    "max_retries": "collectors.<NAME>.retry (the runtime retries until it works)",
                    "retry_initial_backoff_ms": "collectors.<NAME>.retry.initial_backoff_ms",
                    "retry_max_backoff_ms": "collectors.<NAME>.retry.max_backoff_ms"}

    hosts: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=lambda: ["http://127.0.0.1:9200"], min_length=1, description="Elasticsearch node URLs.")
    index_prefix: str = Field(default="gateway", pattern=r"^[a-z0-9][a-z0-9_.-]*$",
                              description="Indices are <prefix>-<type>-YYYY.MM.DD behind the alias <prefix>-<type>.")
    api_key_env: str | None = Field(default=None,
                                    description="Environment variable holding an API key (encoded form).")
    username: str | None = Field(default=None, description="Basic-auth user.")
    password_env: str | None = Field(default=None,
                                     description="Environment variable holding the basic-auth password.")
    ca_certs: str | None = Field(default=None, description="CA bundle (PEM) path.")
    verify_certs: bool = Field(default=True, description="Verify the nodes' TLS certificates.")
    request_timeout_s: float = Field(default=30.0, gt=0, description="Timeout of one HTTP request.")
    bulk_max_events: int = Field(default=1000, ge=1, description="Most events in one bulk request.")
    bulk_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, description="Most bytes in one bulk request.")
    bulk_concurrency: int = Field(default=2, ge=1,
                                  description="Bulk requests in flight at once (raise it for a multi-node cluster).")
    install_templates: bool = Field(default=True, description="Install/update the index templates at start-up "
                                                              "(needs manage_index_templates).")
    number_of_shards: int = Field(default=1, ge=1, description="Shards of each daily index.")
    number_of_replicas: int | None = Field(default=None, ge=0, description="null keeps the cluster default.")
    refresh_interval: str = Field(default="1s", description="Index refresh interval (an Elasticsearch time value).")
    delete_after_days: int | None = Field(default=None, ge=1,
                                          description="ILM policy deleting daily indices after N days (skipped, "
                                                      "with a notice, where the server has no ILM).")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for :class:`AsyncElasticsearch`; secrets are read from the environment here."""
        options: dict[str, Any] = {
            "hosts": self.hosts,
            "request_timeout": self.request_timeout_s,
            "verify_certs": self.verify_certs,
            # The runtime owns retries (per item, with backoff); the transport must not resend whole bulks.
            "max_retries": 0,
            "retry_on_status": (),
            "retry_on_timeout": False,
            "serializer": OrjsonSerializer(),
            "connections_per_node": max(10, self.bulk_concurrency * 2),
        }
        if self.ca_certs:
            options["ca_certs"] = self.ca_certs
        if self.api_key_env:
            options["api_key"] = _secret(self.api_key_env, "api_key_env")
        elif self.username:
            options["basic_auth"] = (self.username, _secret(self.password_env, "password_env"))
        return options


def _secret(env: str | None, setting: str) -> str:
    value = os.environ.get(env or "")
    if not value:
        raise ConfigError(f"elasticsearch.{setting}: environment variable {env!r} is not set")
    return value


def redact_url(url: str) -> str:
    """``url`` without any user:password part, for logs."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def document(event: Event) -> dict[str, Any]:
    """The ``_source`` of ``event``: the event itself plus the derived fields."""
    doc = event.to_dict()
    code = doc.get("status_code")
    if isinstance(code, int):
        doc["status_class"] = status_class(code)
    return doc


_DUMPS_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


@dataclass(slots=True)
class _Item:
    """One bulk operation, pre-serialised so a retry resends the same bytes."""

    event_id: str
    lines: bytes  # action line + source line, each newline-terminated


def source_line(event: Event, raw: bytes | None) -> bytes:
    """The ``_source`` JSON of ``event``, spliced from its Kafka value ``raw`` when that is safe.

    The runtime has already validated ``raw``; appending the derived field to it avoids a
    model dump and a second serialisation (the bulk of this sink's CPU time). A value that
    spans lines (ndjson!) or already carries a derived field is re-encoded from the model.
    """
    if raw is not None:
        body = raw.strip()
        if body.endswith(b"}") and b"\n" not in body and b'"status_class"' not in body and len(body) > 2:
            code = getattr(event, "status_code", None)
            if not isinstance(code, int):
                return body
            return body[:-1] + b',"status_class":"' + status_class(code).encode() + b'"}'
    return orjson.dumps(document(event), option=_DUMPS_OPTIONS)


def encode_items(prefix: str, event_type: EventType, events: Sequence[Event],
                 values: Sequence[bytes] | None = None) -> list[_Item]:
    """One pre-serialised bulk operation per event; ``values`` are the events' Kafka values, if known."""
    items = []
    for i, event in enumerate(events):
        action = {"index": {"_index": tpl.index_name(prefix, event_type, event.emitted_at), "_id": event.id}}
        source = source_line(event, values[i] if values is not None else None)
        items.append(_Item(event.id, orjson.dumps(action) + b"\n" + source + b"\n"))
    return items


def chunk_items(items: Sequence[_Item], max_events: int, max_bytes: int) -> list[list[_Item]]:
    """Split into bulk requests of at most ``max_events`` items and (unless one item is larger) ``max_bytes``."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    size = 0
    for item in items:
        if current and (len(current) >= max_events or size + len(item.lines) > max_bytes):
            chunks.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item.lines)
    if current:
        chunks.append(current)
    return chunks


def _item_reason(error: Any) -> str:
    """``type: reason (caused by: ...)`` from a bulk item error object."""
    if not isinstance(error, dict):
        return str(error)
    text = f"{error.get('type', 'error')}: {error.get('reason', '')}"
    cause = error.get("caused_by")
    if isinstance(cause, dict) and cause.get("reason"):
        text += f" (caused by {cause.get('type', 'error')}: {cause['reason']})"
    return text


def _retriable_status(status: int) -> bool:
    return status == 429 or status >= 500


class _Metrics:
    """Prometheus counters on the registry the runtime hands over (none: metrics off)."""

    def __init__(self, registry: Any) -> None:
        self.enabled = registry is not None
        if not self.enabled:
            return
        from prometheus_client import Counter, Histogram

        from collectors.metrics import DURATION_BUCKETS

        self.documents = Counter("gateway_tap_es_documents_total", "Bulk items by event type and outcome "
                                 "(indexed, rejected, retried)", ["type", "outcome"], registry=registry)
        self.bulk_seconds = Histogram("gateway_tap_es_bulk_seconds", "Duration of one bulk request",
                                      buckets=DURATION_BUCKETS, registry=registry)

    def count(self, event_type: str, outcome: str, n: int) -> None:
        if self.enabled and n:
            self.documents.labels(event_type, outcome).inc(n)

    def observe(self, seconds: float) -> None:
        if self.enabled:
            self.bulk_seconds.observe(seconds)


@contextlib.asynccontextmanager
async def refresh_interval_raised(settings: EsConfig, value: str) -> AsyncIterator[dict[str, str | None]]:
    """Set ``index.refresh_interval`` of the existing ``<index_prefix>-*`` indices to ``value`` (a backfill: fewer
    refreshes, faster bulk indexing); on exit put back each index's previous value. Yields index -> previous value.

    Indices created meanwhile (a new day) get the template's ``refresh_interval``, untouched.
    """
    pattern = f"{settings.index_prefix}-*"
    client = AsyncElasticsearch(**settings.client_options())
    previous: dict[str, str | None] = {}
    try:
        current = await client.indices.get_settings(index=pattern, allow_no_indices=True)
        previous = {index: body["settings"]["index"].get("refresh_interval") for index, body in current.body.items()}
        if previous:
            await client.indices.put_settings(index=",".join(previous), settings={"index": {"refresh_interval": value}})
        yield previous
    finally:
        try:
            for index, old in previous.items():
                # null resets to the cluster default, which is what an index without the setting had.
                await client.indices.put_settings(index=index, settings={"index": {"refresh_interval": old}})
        finally:
            await client.close()


class ElasticsearchCollector(DataCollector):
    """Indexes proxy logs, analytics and budget usage into daily indices with explicit mappings.

    Config: :class:`EsConfig` (listed in ``docs/configuration.md``).
    """

    event_types: ClassVar[tuple[EventType, ...]] = EVENT_TYPES
    Config = EsConfig
    # Each handler call indexes its batch on its own (flush is a no-op) and ``_id`` = event id makes order moot.
    concurrent_batches: ClassVar[int] = 2
    ordered_delivery: ClassVar[bool] = False

    settings: EsConfig
    client: AsyncElasticsearch
    _templates_ready: bool = False
    lifecycle_supported: bool | None = None
    """After start-up: whether the ILM policy was installed (None: not requested)."""

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        self.settings = parse_collector_config(services.name, EsConfig, config)
        self.log = services.logger
        self.metrics = _Metrics(services.metrics)
        self.client = AsyncElasticsearch(**self.settings.client_options())
        self._templates_lock = asyncio.Lock()
        self._templates_ready = not self.settings.install_templates
        self.log.info("elasticsearch collector: hosts=%s prefix=%s",
                      ",".join(redact_url(h) for h in self.settings.hosts), self.settings.index_prefix)
        try:
            await self._ensure_templates()
        except RetryLater as exc:
            # Not fatal: the first batch installs them once the cluster answers (the runtime pauses meanwhile).
            self.log.warning("elasticsearch: templates not installed yet: %s", exc.reason)

    async def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            await client.close()

    # --- start-up -------------------------------------------------------------------------------------

    async def _ensure_templates(self) -> None:
        if self._templates_ready:
            return
        async with self._templates_lock:
            if self._templates_ready:
                return
            try:
                await self.install_templates()
            except (ConnectionError, ConnectionTimeout) as exc:
                raise RetryLater(f"elasticsearch unreachable while installing templates: {exc}") from exc
            except ApiError as exc:
                raise RetryLater(f"elasticsearch refused the index templates ({exc.meta.status}): {exc.message}; "
                                 "check the credentials' privileges (manage_index_templates, manage_ilm) or set "
                                 "install_templates: false") from exc
            self._templates_ready = True

    async def install_templates(self) -> None:
        """Install or update the lifecycle policy (where supported), component and index templates."""
        s = self.settings
        policy = None
        if s.delete_after_days is not None:
            policy = await self._install_lifecycle_policy(s.delete_after_days)
        prefix = s.index_prefix
        await self.client.cluster.put_component_template(
            name=tpl.common_component_name(prefix),
            body=tpl.common_component(s.number_of_shards, s.number_of_replicas, s.refresh_interval, policy),
        )
        for event_type in EVENT_TYPES:
            await self.client.indices.put_index_template(
                name=tpl.alias_name(prefix, event_type), body=tpl.index_template(prefix, event_type))
        self.log.info("elasticsearch: index templates %s-{%s} version %d installed", prefix,
                      ",".join(EVENT_TYPES), tpl.TEMPLATE_VERSION)

    async def _install_lifecycle_policy(self, days: int) -> str | None:
        name = tpl.policy_name(self.settings.index_prefix)
        try:
            await self.client.ilm.put_lifecycle(name=name, body=tpl.lifecycle_policy(days))
        except ApiError as exc:
            # noida-db and some hosted offerings have no ILM endpoint ("no handler found"): skip, do not fail.
            no_handler = "no handler found" in str(exc.body).lower()
            if not (no_handler or exc.meta.status in (404, 405, 410)):
                raise
            self.log.warning("elasticsearch: the server has no index lifecycle management; delete_after_days="
                             "%d is not applied (delete old daily indices yourself)", days)
            self.lifecycle_supported = False
            return None
        self.lifecycle_supported = True
        return name

    # --- batches --------------------------------------------------------------------------------------

    async def handle_proxy_log_batch(self, events: Sequence[ProxyLog]) -> None:
        await self.index_batch("proxy_log", events)

    async def handle_analytics_batch(self, events: Sequence[Analytics]) -> None:
        await self.index_batch("analytics", events)

    async def handle_budget_usage_batch(self, events: Sequence[BudgetUsage]) -> None:
        await self.index_batch("budget_usage", events)

    async def handle_raw_batch(self, event_type: EventType, events: Sequence[Event], values: Sequence[bytes]) -> None:
        """What the runtime calls: index straight from the already validated message values."""
        await self.index_batch(event_type, events, values)

    async def index_batch(self, event_type: EventType, events: Sequence[Event],
                          values: Sequence[bytes] | None = None) -> None:
        """Index ``events``; return only when each one is indexed, else raise (see the module doc).

        :param values: the events' Kafka message values (``_source`` is spliced from them), or None.

        :raises RetryLater: the cluster is unreachable, or items kept failing with 429/5xx.
        :raises BadEvents: the server rejected some documents (400); all others are indexed.
        """
        if not events:
            return
        await self._ensure_templates()
        s = self.settings
        items = encode_items(s.index_prefix, event_type, events, values)
        chunks = chunk_items(items, s.bulk_max_events, s.bulk_max_bytes)
        limit = asyncio.Semaphore(s.bulk_concurrency)

        async def run(chunk: list[_Item]) -> tuple[dict[str, str], list[str], str]:
            async with limit:
                try:
                    return await self._send(event_type, chunk)
                except RetryLater as exc:  # this request failed as a whole: its items are to retry
                    self.metrics.count(event_type, "retried", len(chunk))
                    return {}, [item.event_id for item in chunk], exc.reason

        rejected: dict[str, str] = {}
        pending: list[str] = []
        reasons: list[str] = []
        for chunk_rejected, chunk_pending, reason in await asyncio.gather(*(run(c) for c in chunks)):
            rejected.update(chunk_rejected)
            pending.extend(chunk_pending)
            if chunk_pending:
                reasons.append(reason)
        if pending:
            raise RetryLater(f"{len(pending)} of {len(items)} document(s) not indexed: {reasons[0]}",
                             pending=pending, rejected=rejected)
        if rejected:
            raise BadEvents(rejected)

    async def _send(self, event_type: EventType, chunk: list[_Item]) -> tuple[dict[str, str], list[str], str]:
        """Send one bulk request once. Returns the rejected (400...) items, the ids to retry (429/5xx) and why.

        :raises RetryLater: the request failed as a whole (unreachable, refused).
        """
        s = self.settings
        rejected: dict[str, str] = {}
        status, items = await self._bulk(chunk)
        if items is None:  # the whole request was answered 429/5xx
            self.metrics.count(event_type, "retried", len(chunk))
            return rejected, [item.event_id for item in chunk], f"bulk request answered HTTP {status}"
        retry: list[str] = []
        reason = ""
        for item, result in zip(chunk, items, strict=True):
            outcome = next(iter(result.values()))
            code = int(outcome.get("status", 500))
            if code < 300:
                continue
            if _retriable_status(code):
                retry.append(item.event_id)
                reason = f"HTTP {code} {_item_reason(outcome.get('error'))}"
            elif code == 400:
                rejected[item.event_id] = f"elasticsearch rejected the document: {_item_reason(outcome.get('error'))}"
            else:
                raise RetryLater(f"elasticsearch answered HTTP {code} for a bulk item "
                                 f"({_item_reason(outcome.get('error'))}); check the index privileges and "
                                 f"that indices {s.index_prefix}-* may be auto-created")
        self.metrics.count(event_type, "indexed", len(chunk) - len(retry) - len(rejected))
        self.metrics.count(event_type, "rejected", len(rejected))
        self.metrics.count(event_type, "retried", len(retry))
        return rejected, retry, reason

    async def _bulk(self, items: list[_Item]) -> tuple[int, list[dict[str, Any]] | None]:
        """POST one ``_bulk``. Returns (status, per-item results), or (status, None) for a retriable refusal."""
        body = b"".join(item.lines for item in items)
        started = time.perf_counter()
        try:
            # Pre-built ndjson bytes pass through the client's serializer untouched (no re-encoding).
            resp = await self.client.bulk(operations=body)  # type: ignore[arg-type]
        except (ConnectionError, ConnectionTimeout) as exc:
            raise RetryLater(f"elasticsearch unreachable ({', '.join(map(redact_url, self.settings.hosts))}): "
                             f"{type(exc).__name__}") from exc
        except ApiError as exc:
            if _retriable_status(exc.meta.status):
                return exc.meta.status, None
            hint = " (lower bulk_max_bytes)" if exc.meta.status == 413 else ""
            raise RetryLater(f"elasticsearch refused the bulk request: HTTP {exc.meta.status} "
                             f"{exc.message}{hint}") from exc
        except TransportError as exc:
            raise RetryLater(f"elasticsearch transport error: {type(exc).__name__}: {exc.message}") from exc
        finally:
            self.metrics.observe(time.perf_counter() - started)
        result: list[dict[str, Any]] = resp.body["items"]
        if len(result) != len(items):
            raise RetryLater(f"bulk answered {len(result)} items for {len(items)} operations")
        return resp.meta.status, result
