"""``rate_limits`` (requests, tokens and concurrent requests per app, key, app x LLM / model) and
``rate_limiting`` (how the tap enforces them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway_tap.settings.base import RESTART, Section

RateLimitKind = Literal["requests", "tokens", "concurrent"]


class RateLimitSettings(Section):
    """One set of limits for one scope: an app (optionally one of its LLMs, or one model of that LLM), or a key."""

    app_id: str | None = Field(default=None, min_length=1, description="Limit the requests of this app.")
    llm_id: str | None = Field(default=None, min_length=1,
                               description="With app_id: only its requests to this LLM.")
    model: str | None = Field(default=None, min_length=1,
                              description="With app_id and llm_id: only its requests for this model (the request's "
                                          "'model').")
    key_id: str | None = Field(default=None, min_length=1,
                               description="Instead of app_id: limit one key, named by its id (apps[].key_ids, or "
                                           "'sha256:' and the first 12 hex digits of its hash) or by its whole "
                                           "'sha256:<hex>' hash.")
    requests_per_minute: int | None = Field(default=None, ge=1, description="Requests admitted per minute.")
    tokens_per_minute: int | None = Field(
        default=None, ge=1,
        description="Tokens per minute: estimated at admission (prompt characters / 4 plus the output limit), "
                    "settled with the actual usage when the request ends.")
    max_concurrent: int | None = Field(default=None, ge=1, description="Requests in flight at once.")

    @model_validator(mode="after")
    def _check(self) -> RateLimitSettings:
        if (self.app_id is None) == (self.key_id is None):
            raise ValueError("set exactly one of app_id and key_id")
        if self.key_id is not None and (self.llm_id or self.model):
            raise ValueError("llm_id and model narrow an app's limits; a key's limits cover all its requests")
        if self.model is not None and self.llm_id is None:
            raise ValueError("model needs llm_id (a model name means something per LLM)")
        if self.requests_per_minute is None and self.tokens_per_minute is None and self.max_concurrent is None:
            raise ValueError("set requests_per_minute, tokens_per_minute and/or max_concurrent")
        return self

    @property
    def scope(self) -> str:
        """Identity of this entry: ``app=<id>[,llm=<id>[,model=<name>]]`` or ``key=<id>``."""
        if self.key_id is not None:
            return f"key={self.key_id}"
        out = f"app={self.app_id}"
        if self.llm_id:
            out += f",llm={self.llm_id}"
        if self.model:
            out += f",model={self.model}"
        return out


class RateLimitingSettings(Section):
    """How the tap enforces ``rate_limits`` (a built-in post-auth step, like the budget step)."""

    enabled: bool = Field(default=True, description="Check rate limits before forwarding requests.")
    mode: Annotated[Literal["local", "shared"], RESTART] = Field(
        default="local",
        description="local: counters per worker process (no I/O; with N workers and taps an app gets up to N times "
                    "its limits); shared: exact across every worker and tap, one Redis round trip per request "
                    "(the redis section).")
    position: Literal["before_plugins", "after_plugins"] = Field(
        default="before_plugins",
        description="Where the step runs relative to plugins' post-auth hooks (and after the budget step when both "
                    "have the same position).")
    on_redis_error: Literal["fail_open", "fail_closed"] = Field(
        default="fail_open",
        description="shared mode with Redis unreachable: fail_open admits requests (counted, not limited), "
                    "fail_closed rejects the requests of limited apps and keys with 503 rate_limit_unavailable.")
    concurrency_lease_s: float = Field(
        default=900.0, gt=0,
        description="shared mode: a request still counted in flight after this long (its tap died) stops counting.")


def check_rate_limit_references(limits: list[RateLimitSettings], app_ids: set[str], llm_ids: set[str]) -> list[str]:
    """Cross-section problems of ``rate_limits``, one ``key.path: message`` line each: duplicate scopes, and
    unknown apps and LLMs when the file declares ``apps`` / ``llms`` at all."""
    problems: list[str] = []
    seen: set[str] = set()
    for i, limit in enumerate(limits):
        if limit.scope in seen:
            problems.append(f"rate_limits[{i}]: duplicate limits for {limit.scope}")
        seen.add(limit.scope)
        if app_ids and limit.app_id is not None and limit.app_id not in app_ids:
            problems.append(f"rate_limits[{i}].app_id: unknown app {limit.app_id!r}")
        if llm_ids and limit.llm_id is not None and limit.llm_id not in llm_ids:
            problems.append(f"rate_limits[{i}].llm_id: unknown LLM {limit.llm_id!r}")
    return problems
