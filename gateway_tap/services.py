"""Services the gateway offers its extensions, tap plugins and collectors alike.

A namespaced key-value store (:class:`MemoryKV`), lookups in the configuration in force
(:class:`Gateway`: apps, LLMs, prices) and the envelope of control messages
(:func:`new_control_message`). How a control message travels differs by host (the tap's spooled
publisher, a collector's acknowledged producer), so each host binds the sending itself.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from gateway_tap.apps import AppIndex
from gateway_tap.pricing import PriceBook
from schemas import ControlMessage, encode_control

if TYPE_CHECKING:
    from gateway_tap.settings import AppConfig, LLMConfig

BudgetStatusFn = Callable[[str, str | None], Awaitable[Mapping[str, Any] | None]]


class KeyValueStore(Protocol):
    """A small async key-value store, namespaced per plugin or collector."""

    async def get(self, key: str) -> Any: ...

    async def set(self, key: str, value: Any, ttl_s: float | None = None) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int: ...


def read_only(value: Any) -> Any:
    """A read-only copy of JSON-like data: mappings become read-only mappings (nested ones too), lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: read_only(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(read_only(v) for v in value)
    return value


@dataclass(frozen=True, slots=True)
class AppInfo:
    """A configured app as plugins and collectors see it: never its keys, not even their hashes."""

    id: str
    name: str
    allowed_llms: tuple[str, ...]
    """LLM ids it may call; ``"*"`` for all."""
    metadata: Mapping[str, Any]
    """Free-form data about the app (``apps[].metadata`` in the file, or the admin API's), read-only."""


def app_info(app: AppConfig) -> AppInfo:
    """What plugins and collectors may know of ``app``."""
    return AppInfo(app.id, app.name, tuple(app.allowed_llms), read_only(app.metadata))


@dataclass(frozen=True, slots=True)
class LLMInfo:
    """A configured LLM as plugins see it: never its upstream URL or credential."""

    id: str
    vendor: str
    currency: str
    priced_models: tuple[str, ...]
    """Models with a configured price; ``"*"`` when every other model has one too."""


@dataclass(frozen=True, slots=True)
class Price:
    """What the tap charges for a model: ``currency`` per million tokens of each class, and where it came from
    (``source``: ``config:<model>``, ``config:*`` or ``catalog:<provider>/<model id>``; docs/pricing.md)."""

    input_per_1m: float
    output_per_1m: float
    currency: str
    cache_read_per_1m: float | None = None
    cache_write_per_1m: float | None = None
    reasoning_per_1m: float | None = None
    source: str | None = None
    version: str | None = None


class GatewayServices(Protocol):
    """What the gateway offers plugins and collectors; answers come from the configuration in force (reloads
    included)."""

    def validate_credential(self, key: str) -> AppInfo | None:
        """The app a presented key belongs to, or ``None``."""
        ...

    def get_app(self, app_id: str) -> AppInfo | None:
        """The app ``app_id`` (its name, allowed LLMs and metadata), or ``None``."""
        ...

    def list_apps(self) -> list[AppInfo]:
        """Every configured app, in file order."""
        ...

    def get_llm(self, llm_id: str) -> LLMInfo | None: ...

    def list_llms(self) -> list[LLMInfo]:
        """Every configured LLM, in file order."""
        ...

    def price_for(self, llm_id: str, model: str) -> Price | None:
        """The price the tap charges for ``model`` on ``llm_id`` now (the LLM's own price for it, else the price
        catalog's, else the LLM's ``"*"`` price); ``None`` for an unknown LLM or an unpriced model."""
        ...

    async def budget_status(self, app_id: str, llm_id: str | None = None) -> Mapping[str, Any] | None:
        """The app's current budget standing, or ``None`` when budgets are not configured."""
        ...


class MemoryKV:
    """In-process key-value store; each plugin sees only its own namespace.

    It lives in one worker process: state that must be shared between workers
    belongs in an external store the plugin talks to itself.
    """

    def __init__(self, data: dict[str, tuple[Any, float | None]], namespace: str, max_keys: int = 100_000) -> None:
        self._data = data
        self._prefix = namespace + "\x00"
        self._max_keys = max_keys

    def _get(self, key: str) -> tuple[Any, float | None] | None:
        item = self._data.get(self._prefix + key)
        if item is not None and item[1] is not None and item[1] < time.monotonic():
            del self._data[self._prefix + key]
            return None
        return item

    async def get(self, key: str) -> Any:
        item = self._get(key)
        return None if item is None else item[0]

    async def set(self, key: str, value: Any, ttl_s: float | None = None) -> None:
        if len(self._data) >= self._max_keys and self._prefix + key not in self._data:
            self._evict_expired()
            if len(self._data) >= self._max_keys:
                raise OverflowError(f"key-value store is full ({self._max_keys} keys)")
        self._data[self._prefix + key] = (value, time.monotonic() + ttl_s if ttl_s else None)

    async def delete(self, key: str) -> None:
        self._data.pop(self._prefix + key, None)

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        item = self._get(key)
        value = (int(item[0]) if item else 0) + amount
        expires = item[1] if item else (time.monotonic() + ttl_s if ttl_s else None)
        self._data[self._prefix + key] = (value, expires)
        return value

    def _evict_expired(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, exp) in self._data.items() if exp is not None and exp < now]:
            del self._data[k]


def _llm_info(llm: LLMConfig) -> LLMInfo:
    return LLMInfo(llm.id, llm.vendor, llm.currency, tuple(llm.prices))


class Gateway:
    """The :class:`gateway_tap.hooks.GatewayServices` implementation, answering from the configuration in force."""

    def __init__(self, apps: AppIndex, budget_status: BudgetStatusFn | None = None,
                 llms: Sequence[LLMConfig] = ()) -> None:
        self.budget_status_fn = budget_status
        self._config: tuple[AppIndex, dict[str, LLMConfig], list[LLMInfo], dict[str, AppInfo]] = (
            AppIndex(()), {}, [], {})
        self.use_config(apps, llms)

    @classmethod
    def from_config(cls, apps: Sequence[AppConfig], llms: Sequence[LLMConfig],
                    budget_status: BudgetStatusFn | None = None) -> Gateway:
        """Lookups over ``apps`` and ``llms`` as declared in a config file."""
        return cls(AppIndex(apps), budget_status, llms)

    def use_config(self, apps: AppIndex, llms: Sequence[LLMConfig]) -> None:
        """Answer from ``apps`` and ``llms`` from now on (start-up, a configuration reload): one assignment,
        so a plugin sees the old or the new configuration, never a mix."""
        # An app whose entry is the same object as before (a reload that did not touch it) keeps its view.
        before, infos = self._config[0].by_id, self._config[3]
        self._config = (apps, {llm.id: llm for llm in llms}, [_llm_info(llm) for llm in llms],
                        {app.id: infos[app.id] if before.get(app.id) is app else app_info(app)
                         for app in apps.by_id.values()})
        self._books: dict[str, PriceBook] = {}  # built on first use (the catalog loads only when asked)

    def validate_credential(self, key: str) -> AppInfo | None:
        app = self._config[0].app_for_key(key)
        return self._config[3][app.id] if app is not None else None

    def get_app(self, app_id: str) -> AppInfo | None:
        return self._config[3].get(app_id)

    def list_apps(self) -> list[AppInfo]:
        return list(self._config[3].values())

    def get_llm(self, llm_id: str) -> LLMInfo | None:
        llm = self._config[1].get(llm_id)
        return _llm_info(llm) if llm is not None else None

    def list_llms(self) -> list[LLMInfo]:
        return list(self._config[2])

    def price_for(self, llm_id: str, model: str) -> Price | None:
        llm = self._config[1].get(llm_id)
        if llm is None:
            return None
        book = self._books.get(llm_id)
        if book is None:
            book = self._books[llm_id] = PriceBook.for_llm(llm)
        plan = book.plan(model, at=datetime.now(UTC))
        if plan is None:
            return None
        rates = plan.base.per_1m_usd()
        return Price(rates["input"], rates["output"], llm.currency, rates["cache_read"], rates["cache_write"],
                     rates["reasoning"], plan.source, book.version)

    async def budget_status(self, app_id: str, llm_id: str | None = None) -> Mapping[str, Any] | None:
        if self.budget_status_fn is None:
            return None
        return await self.budget_status_fn(app_id, llm_id)


def new_control_message(gateway_id: str, plugin: str, kind: str,
                        payload: Mapping[str, Any]) -> tuple[ControlMessage, bytes]:
    """The envelope around ``payload`` and its Kafka message value.

    :raises TypeError: ``payload`` is not JSON-serialisable (raised in the sender's call, not later).
    """
    message = ControlMessage(gateway_id=gateway_id, plugin=plugin, kind=kind, payload=dict(payload))
    return message, encode_control(message)
