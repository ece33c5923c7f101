"""The one YAML configuration file (``gateway-tap.yaml``), declared and validated in one place.

Every section is a pydantic model with ``extra="forbid"``, so a typo is an error
that names its key path instead of a silently ignored setting. Each field's
``description`` is its documentation. :func:`load_config` is the only way in.

Sections are owned by the part of the system that uses them: ``kafka`` (here),
``tap``, ``llms``, ``apps``, ``plugins`` (the tap), ``collectors`` (the collector
runtime), ``budgets`` and ``budget_store`` (budget enforcement and store).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from collectors.settings import CollectorSettings
from gateway_tap.budgets.settings import (
    BudgetEnforcementSettings,
    BudgetSettings,
    BudgetStoreSettings,
    check_budget_references,
)

if TYPE_CHECKING:
    from gateway_tap.publisher.settings import PublisherSettings


class Section(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(Section):
    """Connection to the Kafka cluster, shared by the tap and every collector."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    topic_prefix: str = Field("gateway", pattern=r"^[A-Za-z0-9._-]+$",
                              description="Topics are <prefix>.proxy_logs, <prefix>.analytics, <prefix>.budget_usage.")
    client_id: str = Field("gateway-tap", description="Kafka client id prefix.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username_env: str | None = Field(None, description="Environment variable holding the SASL user name.")
    sasl_password_env: str | None = Field(None, description="Environment variable holding the SASL password.")
    ssl_cafile: str | None = Field(None, description="CA bundle for SSL/SASL_SSL.")
    request_timeout_ms: int = Field(30_000, gt=0)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients; secrets are read from the environment here."""
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism:
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = os.environ.get(self.sasl_username_env or "", "")
            options["sasl_plain_password"] = os.environ.get(self.sasl_password_env or "", "")
        if self.ssl_cafile:
            import ssl

            options["ssl_context"] = ssl.create_default_context(cafile=self.ssl_cafile)
        return options


def _default_publisher() -> PublisherSettings:
    from gateway_tap.publisher.settings import PublisherSettings

    return PublisherSettings()


class ListenSettings(Section):
    """Where the tap accepts client connections."""

    host: str = Field("127.0.0.1", description="Interface to bind (0.0.0.0 for all).")
    port: int = Field(8080, ge=0, le=65535)


class LimitSettings(Section):
    """Request limits enforced before anything is forwarded."""

    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")


class ReloadSettings(Section):
    """Live configuration reload: always on SIGHUP; with ``watch`` also when the file's content changes."""

    watch: bool = Field(False, description="Poll the file and reload when its content changed.")
    interval_s: float = Field(2.0, gt=0, description="Polling interval of watch (stat; hashed only on change).")


class TapSettings(Section):
    """The proxy process: listening socket, workers, limits, logging and event publishing."""

    listen: ListenSettings = Field(default_factory=ListenSettings)  # type: ignore[arg-type]
    workers: int = Field(1, ge=1, le=64, description="Worker processes sharing the port (SO_REUSEPORT).")
    limits: LimitSettings = Field(default_factory=LimitSettings)  # type: ignore[arg-type]
    access_log: bool = Field(True, description="One structured JSON log line per request.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    capture_bodies: bool = Field(False, description="Put (truncated, redacted) bodies into proxy_log events.")
    body_capture_bytes: int = Field(4096, ge=0, description="Captured bodies are truncated to this many bytes.")
    upstream_max_connections: int = Field(1000, ge=1, description="Pooled upstream connections per worker.")
    publisher: PublisherSettings = Field(default_factory=_default_publisher)
    shared_kv_path: str | None = Field(
        None, description="SQLite file of the plugins' shared key-value store (plugins[].kv.backend: shared), "
                          "shared by this tap's worker processes; default <publisher.spool_dir>/plugin-kv.sqlite.")
    reload: ReloadSettings = Field(default_factory=ReloadSettings)  # type: ignore[arg-type]


class ModelPrice(Section):
    """Price of one model in ``currency`` per million tokens."""

    input_per_1m: float = Field(0.0, ge=0)
    output_per_1m: float = Field(0.0, ge=0)


class LLMTimeouts(Section):
    """Upstream timeouts in seconds; exceeding one answers 504."""

    connect_s: float = Field(5.0, gt=0)
    first_byte_s: float = Field(60.0, gt=0, description="From sending the request to the response headers.")
    total_s: float = Field(600.0, gt=0, description="Whole exchange, including a streamed body.")


class LLMConfig(Section):
    """One upstream the tap routes ``/llm/{id}/...`` to."""

    id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    vendor: Literal["openai", "anthropic"]
    upstream_url: str = Field(pattern=r"^https?://", description="Base URL; the rest of the path is appended.")
    api_key_env: str | None = Field(None, description="Environment variable holding the upstream credential.")
    timeouts: LLMTimeouts = Field(default_factory=LLMTimeouts)  # type: ignore[arg-type]
    currency: str = "USD"
    prices: dict[str, ModelPrice] = Field(default_factory=dict,
                                          description="Per model; the key '*' prices any other model.")


class AppConfig(Section):
    """A client application and the keys it authenticates with."""

    id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    name: str = ""
    key_hashes: list[str] = Field(default_factory=list,
                                  description="'sha256:<hex>' of each valid key (gateway-tap hash-key).")
    allowed_llms: list[str] = Field(default_factory=lambda: ["*"], description="LLM ids, or '*' for all.")

    @field_validator("key_hashes")
    @classmethod
    def _check_hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", item):
                raise ValueError(f"{item[:12]!r}... is not 'sha256:' followed by 64 lowercase hex digits")
        return value


class PluginKVSettings(Section):
    """Which key-value store ``services.kv`` is for this plugin."""

    backend: Literal["memory", "shared"] = Field(
        "memory", description="memory: a dict per worker process (fastest, not shared, lost on restart); shared: "
                              "the SQLite file tap.shared_kv_path, shared by the tap's worker processes.")
    max_bytes: int = Field(64 * 1024 * 1024, gt=0,
                           description="shared only: bound on this plugin's keys + values; the oldest entries "
                                       "are evicted to make room.")


class PluginConfig(Section):
    """One plugin in the hook chain."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Unique; also the /plugins/{name}/ slug.")
    use: str = Field(description="'package.module:Class' or an entry point name in group gateway_tap.plugins.")
    llms: list[str] = Field(default_factory=lambda: ["*"], description="LLM ids it attaches to, or '*'.")
    order: int = Field(0, description="Lower runs first; ties keep file order.")
    timeout_ms: float = Field(1000.0, gt=0, description="Per hook call.")
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    enabled: bool = True
    config: dict[str, Any] = Field(default_factory=dict, description="Validated against the plugin's schema.")
    kv: PluginKVSettings = Field(default_factory=PluginKVSettings)  # type: ignore[arg-type]


class GatewayConfig(Section):
    """The whole file."""

    gateway_id: str = Field(default_factory=socket.gethostname,
                            description="Identifies this tap in every event (default: host name).")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    tap: TapSettings = Field(default_factory=TapSettings)  # type: ignore[arg-type]
    llms: list[LLMConfig] = Field(default_factory=list)
    apps: list[AppConfig] = Field(default_factory=list)
    plugins: list[PluginConfig] = Field(default_factory=list)
    budgets: list[BudgetSettings] = Field(default_factory=list, description="Spend/token budgets per app (x LLM).")
    budget_store: BudgetStoreSettings = Field(default_factory=BudgetStoreSettings)  # type: ignore[arg-type]
    budget_enforcement: BudgetEnforcementSettings = Field(
        default_factory=BudgetEnforcementSettings)  # type: ignore[arg-type]
    collectors: dict[str, CollectorSettings] = Field(
        default_factory=dict, description="Collector workers by NAME (as given to `gateway-tap collect NAME`).")


def _check_tap_references(config: GatewayConfig) -> list[str]:
    """Cross-section checks pydantic cannot express: unique ids and references to known LLMs."""
    problems: list[str] = []
    llm_ids = {llm.id for llm in config.llms}
    for section, items in (("llms", config.llms), ("apps", config.apps), ("plugins", config.plugins)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            key = getattr(item, "name" if section == "plugins" else "id")
            if key in seen:
                problems.append(f"{section}[{i}]: duplicate {'name' if section == 'plugins' else 'id'} {key!r}")
            seen.add(key)
    for section, refs in (("apps", [a.allowed_llms for a in config.apps]),
                          ("plugins", [p.llms for p in config.plugins])):
        field = "allowed_llms" if section == "apps" else "llms"
        for i, ids in enumerate(refs):
            for j, llm_id in enumerate(ids):
                if llm_id != "*" and llm_id not in llm_ids:
                    problems.append(f"{section}[{i}].{field}[{j}]: unknown LLM {llm_id!r}")
    return problems


class ConfigFileError(ValueError):
    """The configuration file is unreadable or invalid. ``str()`` lists each problem by key path."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid configuration {self.path}:\n" + "\n".join(f"  - {p}" for p in problems))


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def format_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem: ``key.path: message``."""
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        problems.append(f"{_key_path(loc)}: {err['msg']}")
    return problems


def parse_config(data: Any, source: str | Path = "<config>") -> GatewayConfig:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(source, [f"(root): expected a mapping, got {type(data).__name__}"])
    _bind_publisher_settings()
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(source, format_validation_error(exc)) from None
    problems = _check_tap_references(config) + check_budget_references(
        config.budgets, {a.id for a in config.apps}, {llm.id for llm in config.llms})
    if problems:
        raise ConfigFileError(source, problems)
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate the YAML file at ``path``.

    :raises ConfigFileError: the file is missing, not YAML, or fails validation;
        the message names every offending key path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigFileError(path, [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigFileError(path, [f"(yaml): {where}{getattr(exc, 'problem', exc)}"]) from None
    return parse_config(data, path)


def _bind_publisher_settings() -> None:
    """Resolve ``tap.publisher``'s type: gateway_tap.publisher.settings builds on :class:`Section`, so it can
    only be imported once this module exists (whichever of the two is imported first)."""
    if TapSettings.__pydantic_complete__ and GatewayConfig.__pydantic_complete__:
        return
    from gateway_tap.publisher.settings import PublisherSettings

    namespace = {"PublisherSettings": PublisherSettings}
    TapSettings.model_rebuild(_types_namespace=namespace)
    GatewayConfig.model_rebuild(force=True, _types_namespace=namespace)


try:
    _bind_publisher_settings()
except ImportError:  # gateway_tap.publisher.settings is importing this module right now; parse_config binds later
    pass
