"""``kafka``: the connection to the Kafka cluster, shared by the tap and every collector."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from gateway_tap.settings.base import Section


class KafkaSettings(Section):
    """Connection to the Kafka cluster, shared by the tap and every collector."""

    bootstrap_servers: str = Field(default="127.0.0.1:9092", description="Comma-separated host:port list.")
    topic_prefix: str = Field(default="gateway", pattern=r"^[A-Za-z0-9._-]+$",
                              description="Topics are <prefix>.proxy_logs, <prefix>.analytics, <prefix>.budget_usage.")
    client_id: str = Field(default="gateway-tap", description="Kafka client id prefix.")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="Transport security of the Kafka connections.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        default=None, description="SASL mechanism (SASL_* protocols).")
    sasl_username_env: str | None = Field(default=None, description="Environment variable holding the SASL user name.")
    sasl_password_env: str | None = Field(default=None, description="Environment variable holding the SASL password.")
    ssl_cafile: str | None = Field(default=None, description="CA bundle for SSL/SASL_SSL.")
    request_timeout_ms: int = Field(default=30_000, gt=0, description="Kafka client request timeout.")

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
