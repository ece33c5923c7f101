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
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collectors.settings import CollectorSettings


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


class GatewayConfig(Section):
    """The whole file."""

    gateway_id: str = Field(default_factory=socket.gethostname,
                            description="Identifies this tap in every event (default: host name).")
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)  # type: ignore[arg-type]
    collectors: dict[str, CollectorSettings] = Field(
        default_factory=dict, description="Collector workers by NAME (as given to `gateway-tap collect NAME`).")


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
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigFileError(source, format_validation_error(exc)) from None


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
