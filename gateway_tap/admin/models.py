"""The admin API's request and response bodies; the OpenAPI document is generated from these.

Request bodies take their constraints and descriptions from the YAML's models, and what they
carry is validated by those models again (:class:`AppConfig` for an app, :class:`BudgetSettings` for a
budget, :class:`PluginConfig` and the plugin's own checks for a plugin), with the same functions each
worker applies the state with (:mod:`gateway_tap.admin.state`), so the API, the file and the workers accept
exactly the same values.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway_tap.settings import (
    AppConfig,
    BudgetSettings,
    LLMTimeouts,
    ModelPrice,
    PluginConfig,
    RateLimitSettings,
)
from gateway_tap.settings.base import DisplayText, Id, Metadata

Source = Literal["api", "yaml"]
"""Where an entry is declared: the API's (changeable through it) or the YAML file's (read-only through it)."""

_APP = AppConfig.model_fields
_BUDGET = BudgetSettings.model_fields
_PLUGIN = PluginConfig.model_fields


class Request(BaseModel):
    """Request bodies: unknown fields are errors (422 naming them)."""

    model_config = ConfigDict(extra="forbid")


class AppCreate(Request):
    """``POST /v1/apps``."""

    id: Id = Field(description=_APP["id"].description)
    name: DisplayText = Field(default="", description=_APP["name"].description)
    allowed_llms: list[str] = Field(default_factory=lambda: ["*"], description=_APP["allowed_llms"].description)
    metadata: Metadata = Field(default_factory=dict, description=_APP["metadata"].description)
    enabled: bool = Field(default=True, description="false: its keys are refused (401) until enabled again.")


class AppUpdate(Request):
    """``PATCH /v1/apps/{app_id}``: only the fields given change."""

    name: DisplayText | None = None
    allowed_llms: list[str] | None = None
    metadata: Metadata | None = None
    enabled: bool | None = None


class App(BaseModel):
    id: str
    name: str
    allowed_llms: list[str]
    metadata: dict[str, Any]
    enabled: bool
    source: Source
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AppList(BaseModel):
    data: list[App]


_LIMIT = RateLimitSettings.model_fields


class KeyRateLimits(Request):
    """A key's own rate limits (every request made with the key counts, whatever LLM)."""

    requests_per_minute: int | None = Field(default=None, ge=1, description=_LIMIT["requests_per_minute"].description)
    tokens_per_minute: int | None = Field(default=None, ge=1, description=_LIMIT["tokens_per_minute"].description)
    max_concurrent: int | None = Field(default=None, ge=1, description=_LIMIT["max_concurrent"].description)


class KeyIssue(Request):
    """``POST /v1/apps/{app_id}/keys`` (every field optional; an empty body or none issues a plain key)."""

    name: DisplayText = Field(default="", description="Names the key to people (at most 200 characters).")
    expires_at: datetime | None = Field(default=None, description="When the key stops being valid (then 401 "
                                                                   "expired_api_key); in the future.")
    expires_in_s: float | None = Field(default=None, gt=0, description="Or: valid for this many seconds.")
    rate_limits: KeyRateLimits | None = Field(default=None, description="The key's own rate limits.")


class KeyUpdate(Request):
    """``PATCH /v1/apps/{app_id}/keys/{key_id}``: only the fields given change (``rate_limits: {}`` drops the
    key's limits)."""

    name: DisplayText | None = None
    expires_at: datetime | None = None
    rate_limits: KeyRateLimits | None = None


class RateLimitSet(Request):
    """``PUT /v1/apps/{app_id}/rate-limits``: the app's limits (or app x LLM, app x LLM x model); replaces those of
    the same scope. Validated as the file's ``rate_limits`` entries."""

    llm_id: Id | None = Field(default=None, description=_LIMIT["llm_id"].description)
    model: str | None = Field(default=None, min_length=1, description=_LIMIT["model"].description)
    requests_per_minute: int | None = Field(default=None, description=_LIMIT["requests_per_minute"].description)
    tokens_per_minute: int | None = Field(default=None, description=_LIMIT["tokens_per_minute"].description)
    max_concurrent: int | None = Field(default=None, description=_LIMIT["max_concurrent"].description)


class RateLimit(BaseModel):
    settings: RateLimitSettings
    source: Source


class RateLimitList(BaseModel):
    data: list[RateLimit]


class KeyRotate(Request):
    """``POST /v1/apps/{app_id}/keys/{key_id}/rotate``."""

    overlap_s: float = Field(default=3600.0, ge=0, le=30 * 86400,
                             description="How long the old key stays valid next to the new one.")


class Key(BaseModel):
    """An issued key as listed: its prefix identifies it; the secret is never shown again."""

    id: str
    app_id: str
    prefix: str
    state: Literal["active", "expiring", "expired", "revoked"]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    name: str = ""
    rate_limits: dict[str, int] | None = None
    lineage_id: str = Field(default="", description="What events (key_id) and the key's budgets name it by: its own "
                                                    "id, or for a rotation's successor its predecessor's lineage id "
                                                    "(the successor keeps the key's budgets and spend).")


class IssuedKey(Key):
    """The answer to issue and rotate: ``key`` is the secret, shown this once only."""

    key: str


class RotatedKey(BaseModel):
    previous: Key
    issued: IssuedKey


class KeyList(BaseModel):
    data: list[Key]


class BudgetSet(Request):
    """``PUT /v1/apps/{app_id}/budgets``: a budget of the app (or app x LLM); replaces the one with the same
    ``llm_id`` and ``period``. ``PUT /v1/apps/{app_id}/keys/{key_id}/budgets``: the same for one key of the app."""

    llm_id: Id | None = Field(default=None, description=_BUDGET["llm_id"].description)
    limit_usd: float | None = Field(default=None, ge=0, description=_BUDGET["limit_usd"].description)
    limit_tokens: int | None = Field(default=None, ge=0, description=_BUDGET["limit_tokens"].description)
    period: Literal["monthly", "daily"] = Field(default="monthly", description=_BUDGET["period"].description)
    mode: Literal["hard", "soft"] = Field(default="hard", description=_BUDGET["mode"].description)
    alert_thresholds: tuple[float, ...] = Field(default=(0.8, 1.0),
                                                description=_BUDGET["alert_thresholds"].description)


class Budget(BaseModel):
    settings: BudgetSettings
    source: Source


class BudgetList(BaseModel):
    """Budgets and what the tap reports for the app (``GET /budget``'s document: spend, limits, resets)."""

    data: list[Budget]
    spend: dict[str, Any] | None = None


class PluginUpdate(Request):
    """``PATCH /v1/plugins/{name}`` (plugins created through the API): only the fields given change."""

    enabled: bool | None = Field(default=None, description=_PLUGIN["enabled"].description)
    llms: list[str] | None = Field(default=None, description=_PLUGIN["llms"].description)
    order: int | None = Field(default=None, description=_PLUGIN["order"].description)
    timeout_ms: float | None = Field(default=None, gt=0, description=_PLUGIN["timeout_ms"].description)
    on_error: Literal["fail_closed", "fail_open"] | None = Field(default=None,
                                                                 description=_PLUGIN["on_error"].description)


class PluginConfigSet(Request):
    """``PUT /v1/plugins/{name}/config``: replaces the plugin's whole ``config``."""

    config: dict[str, Any] = Field(description=PluginConfig.model_fields["config"].description)


class Plugin(BaseModel):
    """A plugin as the API shows it: ``source`` says where the entry is declared, ``config_source`` where its
    config comes from (a file plugin's config may be replaced through the API)."""

    name: str
    use: str
    enabled: bool
    llms: list[str]
    order: int
    timeout_ms: float
    on_error: str
    config: dict[str, Any]
    source: Source
    config_source: Source
    config_schema: dict[str, Any] | None = None


class PluginList(BaseModel):
    data: list[Plugin]


class LLM(BaseModel):
    """An upstream as the admin API shows it: never its URL's credentials nor its key."""

    id: str
    vendor: str
    currency: str
    prices: dict[str, ModelPrice]
    timeouts: LLMTimeouts


class LLMList(BaseModel):
    data: list[LLM]


class RejectedEntry(BaseModel):
    """An entry of the state a worker could not apply (it applies every other one)."""

    entry: str
    error: str


class TapState(BaseModel):
    gateway_id: str
    worker: int
    pid: int
    version: int
    seen_at: datetime
    rejected: list[RejectedEntry] = Field(default_factory=list,
                                          description="Entries of the state this worker left out, and why.")


class Status(BaseModel):
    """``GET /v1/status``: the state's version and the version each tap worker runs."""

    version: int
    applied_version: int
    taps: list[TapState]


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None = None
    request_id: str


class Error(BaseModel):
    """Every error: OpenAI-style."""

    error: ErrorDetail


def datetime_of(seconds: float) -> datetime:
    """Unix seconds -> UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def at(seconds: float | None) -> datetime | None:
    """Unix seconds -> UTC datetime."""
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)
