"""What an LLM call costs: the genai-prices catalog by default, the config's ``prices`` as overrides.

Money is integer micro-USD, as in the budget ledger. A price is held as **pico-USD per token** (USD per
million tokens x 10^6, an integer), so a class's cost is ``tokens x rate`` pico-USD rounded half up to
micro-USD once; the total is the sum of the classes, so the split always adds up exactly.

Token classes (disjoint; together they are everything the call consumed):

- ``input``: prompt tokens neither read from nor written to the provider's prompt cache;
- ``cache_read`` / ``cache_write``: prompt tokens read from / written to that cache;
- ``output``: completion tokens that are not reasoning;
- ``reasoning``: completion tokens spent on reasoning ("thinking").

``prompt_tokens`` counts every input token (the three input classes), ``completion_tokens`` every output
token (both output classes): OpenAI reports it so, Anthropic reports its cache tokens beside
``input_tokens`` and :mod:`gateway_tap.proxy.accounting` adds them in.

Which price applies to a model (:meth:`PriceBook.plan`): the LLM's own ``prices[model]``, else the
catalog's (genai-prices provider ``price_catalog``, default the vendor), else ``prices["*"]``, else none.
A class without a price of its own costs what its parent costs (cache reads and writes the input price,
reasoning the output price). Resolved once per model and cached; a catalog price with dated changes is
cached until its next change, so the hot path does a dictionary lookup and five multiplications.

Every cost names its **price version**: ``<catalog>+<hash>``, the catalog being ``genai-prices-<package
version>`` (the bundled data, never auto-updated, so the version pins every price) or ``none``, the hash the
first 12 hex digits of the SHA-256 of the LLM's price settings (``price_catalog`` and ``prices``). The same
version, usage, model and time (the event's ``emitted_at``) always give the same cost: re-pricing an event
reproduces it exactly (:func:`gateway_tap.pricing.reprice_event`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway_tap.budgets.periods import usd_to_micros

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, Provider

    from gateway_tap.settings import LLMConfig, ModelPrice

NO_CATALOG = "none"
"""``price_catalog: none``: only the config's ``prices`` apply."""
PICOS_PER_MICRO = 1_000_000
_HALF = PICOS_PER_MICRO // 2
_FOREVER = datetime.max.replace(tzinfo=UTC)
_NEVER = datetime.min.replace(tzinfo=UTC)
_MAX_CACHED_MODELS = 4096  # model names come from clients and upstreams: keep the table bounded


class TokenCounts(Protocol):
    """What pricing reads of a call's usage (:class:`gateway_tap.proxy.accounting.Usage`, an event)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cache_read_tokens(self) -> int | None: ...
    @property
    def cache_write_tokens(self) -> int | None: ...
    @property
    def reasoning_tokens(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Rates:
    """Pico-USD per token of each class (= USD per million tokens x 10^6)."""

    input: int
    cache_read: int
    cache_write: int
    output: int
    reasoning: int

    def per_1m_usd(self) -> dict[str, float]:
        """The rates as USD per million tokens (what the config and the catalog say)."""
        return {name: getattr(self, name) / PICOS_PER_MICRO for name in CLASSES}


CLASSES = ("input", "cache_read", "cache_write", "output", "reasoning")


@dataclass(frozen=True, slots=True)
class RatePlan:
    """The rates one model is charged at, with where they came from.

    :param source: ``config:<key>`` (the LLM's ``prices``, ``config:*`` the wildcard) or
        ``catalog:<provider>/<model id>``.
    :param entry: the name of the price entry: the config key or the catalog's model id (a bounded label).
    :param tiers: ``(threshold, rates)`` ascending: a call with more than ``threshold`` prompt tokens is
        charged ``rates`` for all of its tokens (the catalog's tiered prices).
    """

    source: str
    entry: str
    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for threshold, tier in self.tiers:
            if prompt_tokens <= threshold:
                break
            rates = tier
        return rates


@dataclass(slots=True)
class Cost:
    """A call's cost in integer micro-USD, split by token class, with its price's source and version."""

    input_micros: int
    cache_read_micros: int
    cache_write_micros: int
    output_micros: int
    reasoning_micros: int
    source: str
    version: str

    @property
    def total_micros(self) -> int:
        return (self.input_micros + self.cache_read_micros + self.cache_write_micros + self.output_micros
                + self.reasoning_micros)


def split_tokens(usage: TokenCounts) -> tuple[int, int, int, int, int]:
    """``(input, cache_read, cache_write, output, reasoning)`` token counts: disjoint, summing to the
    prompt plus completion tokens (class counts an upstream over-reported are capped by their total)."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    cache_read = min(usage.cache_read_tokens or 0, prompt)
    cache_write = min(usage.cache_write_tokens or 0, prompt - cache_read)
    reasoning = min(usage.reasoning_tokens or 0, completion)
    return prompt - cache_read - cache_write, cache_read, cache_write, completion - reasoning, reasoning


def cost_of(plan: RatePlan, usage: TokenCounts, version: str) -> Cost:
    """What ``usage`` costs at ``plan``'s rates (the classes of :func:`split_tokens`; inlined: the hot path)."""
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    cache_read = usage.cache_read_tokens or 0
    if cache_read > prompt:
        cache_read = prompt
    cache_write = usage.cache_write_tokens or 0
    if cache_write > prompt - cache_read:
        cache_write = prompt - cache_read
    reasoning = usage.reasoning_tokens or 0
    if reasoning > completion:
        reasoning = completion
    r = plan.rates_for(prompt) if plan.tiers else plan.base
    half, per = _HALF, PICOS_PER_MICRO
    return Cost(((prompt - cache_read - cache_write) * r.input + half) // per,
                (cache_read * r.cache_read + half) // per, (cache_write * r.cache_write + half) // per,
                ((completion - reasoning) * r.output + half) // per, (reasoning * r.reasoning + half) // per,
                plan.source, version)


def _picos(price: Decimal) -> int:
    """USD per million tokens as pico-USD per token, rounded half up (catalog prices have <= 6 decimals)."""
    return int((price * PICOS_PER_MICRO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def config_plan(key: str, price: ModelPrice) -> RatePlan:
    """The plan of one ``prices`` entry (floats as :func:`usd_to_micros` reads money: shortest repr, half up)."""
    inp, out = usd_to_micros(price.input_per_1m), usd_to_micros(price.output_per_1m)

    def rate(value: float | None, default: int) -> int:
        return default if value is None else usd_to_micros(value)

    rates = Rates(inp, rate(price.cache_read_per_1m, inp), rate(price.cache_write_per_1m, inp), out,
                  rate(price.reasoning_per_1m, out))
    return RatePlan(f"config:{key}", key, rates)


# -- the catalog ---------------------------------------------------------------------------------------

class Catalog:
    """genai-prices' bundled data (never its auto-update: the package version pins every price)."""

    def __init__(self) -> None:
        from genai_prices import __version__
        from genai_prices.data import providers

        self.version = f"genai-prices-{__version__}"
        self.providers: dict[str, Provider] = {p.id: p for p in providers}
        self._all = list(providers)

    def model(self, provider_id: str, model: str) -> ModelInfo | None:
        """The catalog's entry for ``model`` at ``provider_id`` (or a provider it falls back on), if any."""
        provider = self.providers[provider_id]
        return provider.find_model(model, all_providers=self._all)


@functools.cache
def catalog() -> Catalog:
    """The catalog, loaded once per process (about 0.7 s and 30 MB, so only when an LLM uses it)."""
    return Catalog()


def catalog_version() -> str:
    """``genai-prices-<version>`` of the installed package, without loading its data."""
    from importlib.metadata import version

    return f"genai-prices-{version('genai-prices')}"


def _catalog_rates(prices: Any, threshold: int | None) -> Rates | None:
    """The rates of a genai-prices ``ModelPrice`` for a call just above ``threshold`` prompt tokens
    (None: below every tier). None when it has no per-token input and output price."""
    from genai_prices.types import TieredPrices

    def value(key: str) -> int | None:
        raw = getattr(prices, key, None)
        if raw is None:
            return None
        if isinstance(raw, TieredPrices):
            chosen = raw.base
            if threshold is not None:
                for tier in raw.tiers:
                    if tier.start <= threshold:
                        chosen = tier.price
            return _picos(chosen)
        return _picos(raw)

    inp = value("input_mtok")
    if inp is None:
        inp = value("input_text_mtok")
    out = value("output_mtok")
    if out is None:
        out = value("output_text_mtok")
    if inp is None or out is None:
        return None
    cache_read = value("cache_read_mtok")
    cache_write = value("cache_write_mtok")
    if cache_write is None:
        cache_write = value("cache_write_5m_mtok")
    reasoning = value("output_reasoning_mtok")
    return Rates(inp, inp if cache_read is None else cache_read, inp if cache_write is None else cache_write,
                 out, out if reasoning is None else reasoning)


def _tier_starts(prices: Any) -> list[int]:
    from genai_prices.types import TieredPrices

    starts = {tier.start for value in vars(prices).values() if isinstance(value, TieredPrices)
              for tier in value.tiers}
    return sorted(starts)


def catalog_plan(provider_id: str, info: ModelInfo, at: datetime) -> RatePlan | None:
    """The plan of a catalog model at ``at`` (its dated price in force then)."""
    prices = info.get_prices(at)
    base = _catalog_rates(prices, None)
    if base is None:
        return None
    tiers = []
    for start in _tier_starts(prices):
        rates = _catalog_rates(prices, start)
        if rates is not None:
            tiers.append((start, rates))
    return RatePlan(f"catalog:{provider_id}/{info.id}", info.id, base, tuple(tiers))


def _price_window(info: ModelInfo, at: datetime) -> tuple[datetime, datetime]:
    """``[from, until)`` around ``at`` in which the model's catalog price does not change."""
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    bounds: list[datetime] = []
    if isinstance(info.prices, list):
        for conditional in info.prices:
            constraint = conditional.constraint
            if isinstance(constraint, StartDateConstraint):
                bounds.append(datetime.combine(constraint.start_date, time(0), UTC))
            elif isinstance(constraint, TimeOfDateConstraint):
                day = at.astimezone(UTC).date()
                for offset in (-1, 0, 1):
                    for moment in (constraint.start_time, constraint.end_time):
                        when = datetime.combine(day + timedelta(days=offset), moment)
                        bounds.append(when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC))
    return (max((b for b in bounds if b <= at), default=_NEVER), min((b for b in bounds if b > at), default=_FOREVER))


# -- one LLM's prices ----------------------------------------------------------------------------------

def settings_digest(price_catalog: str | None, prices: Mapping[str, ModelPrice]) -> str:
    """First 12 hex digits of the SHA-256 of an LLM's price settings (canonical JSON)."""
    data = {"price_catalog": price_catalog,
            "prices": {key: price.model_dump(exclude_none=True) for key, price in prices.items()}}
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


class PriceBook:
    """Which price applies to each model of one LLM, resolved once per model.

    :param llm_id: for error messages.
    :param vendor: the LLM's API style; its catalog provider unless ``price_catalog`` says otherwise.
    :param prices: the LLM's ``prices`` (overrides; ``"*"`` for any model nothing else prices).
    :param price_catalog: genai-prices provider id, ``"none"``, or None for the vendor's (only for an LLM
        priced in USD, the catalog's currency).
    :raises ValueError: ``price_catalog`` names no provider of the catalog, or is set for an LLM priced in
        another currency (the message names the key).
    """

    __slots__ = ("_cache", "_catalog", "_config", "_wildcard", "provider", "version")

    def __init__(self, llm_id: str, vendor: str, prices: Mapping[str, ModelPrice], price_catalog: str | None = None,
                 *, currency: str = "USD", load_catalog: Any = catalog) -> None:
        usd = currency.upper() == "USD"
        if price_catalog not in (None, NO_CATALOG) and not usd:
            raise ValueError(f"llms[{llm_id}].price_catalog: the catalog prices in USD, this LLM in {currency}")
        self.provider = (vendor if usd else None) if price_catalog is None else \
            None if price_catalog == NO_CATALOG else price_catalog
        self._catalog: Catalog | None = None
        if self.provider is not None:
            self._catalog = load_catalog()
            assert self._catalog is not None
            if self.provider not in self._catalog.providers:
                known = ", ".join(sorted(self._catalog.providers))
                raise ValueError(f"llms[{llm_id}].price_catalog: {self.provider!r} is not a provider of "
                                 f"{self._catalog.version} (known: {known}; or 'none')")
        self._config = {key: config_plan(key, price) for key, price in prices.items() if key != "*"}
        self._wildcard = config_plan("*", prices["*"]) if "*" in prices else None
        catalog_part = self._catalog.version if self._catalog is not None else NO_CATALOG
        self.version = f"{catalog_part}+{settings_digest(price_catalog, prices)}"
        # model -> (plan, window): window None when the price never changes, else [from, until)
        self._cache: dict[str, tuple[RatePlan | None, tuple[datetime, datetime] | None]] = {}

    @classmethod
    def for_llm(cls, llm: LLMConfig) -> PriceBook:
        """The book of a configured LLM."""
        return cls(llm.id, llm.vendor, llm.prices, llm.price_catalog, currency=llm.currency)

    def _resolve(self, model: str, at: datetime) -> tuple[RatePlan | None, tuple[datetime, datetime] | None]:
        plan = self._config.get(model)
        if plan is not None:
            return plan, None
        if self._catalog is not None and self.provider is not None and model:
            info = self._catalog.model(self.provider, model)
            if info is not None:
                window = _price_window(info, at)
                return catalog_plan(self.provider, info, at), None if window == (_NEVER, _FOREVER) else window
        return None, None

    def _own(self, model: str, at: datetime) -> RatePlan | None:
        """The model's own plan (config, else catalog), cached per model and window."""
        entry = self._cache.get(model)
        if entry is None or (entry[1] is not None and not entry[1][0] <= at < entry[1][1]):
            entry = self._resolve(model, at)
            if len(self._cache) < _MAX_CACHED_MODELS or model in self._cache:
                self._cache[model] = entry
        return entry[0]

    def plan(self, *models: str | None, at: datetime) -> RatePlan | None:
        """The plan of the first of ``models`` with a price of its own (config, else catalog), else ``*``'s."""
        for model in models:
            if model:
                plan = self._own(model, at)
                if plan is not None:
                    return plan
        return self._wildcard

    def cost(self, usage: TokenCounts, *models: str | None, at: datetime) -> Cost | None:
        """What ``usage`` costs (``models``: as the upstream reported it, then as requested); None unpriced."""
        plan = self.plan(*models, at=at)
        return None if plan is None else cost_of(plan, usage, self.version)

    def warm(self, models: Sequence[str], at: datetime) -> None:
        """Resolve ``models`` now (at load) so their first requests find them cached."""
        for model in models:
            if model != "*":
                self._own(model, at)

    def unpriced(self, models: Sequence[str], at: datetime) -> list[str]:
        """Which of ``models`` no price applies to (check-config's warning)."""
        return [model for model in models if self.plan(model, at=at) is None]



class RecordedCall(TokenCounts, Protocol):
    """What re-pricing reads of an analytics event (:class:`schemas.Analytics`)."""

    @property
    def model(self) -> str: ...
    @property
    def response_model(self) -> str | None: ...
    @property
    def request_model(self) -> str | None: ...
    @property
    def emitted_at(self) -> datetime: ...
    @property
    def price_version(self) -> str | None: ...


def reprice(book: PriceBook, event: RecordedCall) -> Cost | None:
    """What ``book`` charges for the call an analytics event records: its token classes, its models (the
    upstream's, then the requested one, as the tap looked them up) and its time (``emitted_at``, the instant the
    tap priced at). With the event's own ``price_version`` this is the cost the event carries, exactly. An event
    written before revision 1.2 (no ``price_version``, no ``response_model``) is priced by its ``model``."""
    if event.price_version is None:
        return book.cost(event, event.model, at=event.emitted_at)
    return book.cost(event, event.response_model, event.request_model, at=event.emitted_at)
