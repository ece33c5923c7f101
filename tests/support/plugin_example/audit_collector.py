"""A third-party collector, as a plugin author would write it in their own module.

Run with ``gateway-tap collect audit_collector:AuditCollector`` (this folder on PYTHONPATH).
It appends ``<id> <model>`` lines for analytics events to ``config.path`` and rejects
events whose model is ``forbidden`` (they end up in the dead-letter topic).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from collectors import BadEvent, CollectorServices, DataCollector
from schemas import Analytics


class AuditCollector(DataCollector):
    config_schema = {
        "type": "object",
        "required": ["path"],
        "additionalProperties": False,
        "properties": {"path": {"type": "string"}},
    }

    async def initialize(self, config: dict[str, Any], services: CollectorServices) -> None:
        await super().initialize(config, services)
        self.lines: list[str] = []

    async def handle_analytics(self, event: Analytics) -> None:
        if event.model == "forbidden":
            raise BadEvent("model 'forbidden' is not allowed")
        self.lines.append(f"{event.id} {event.model}\n")

    async def flush(self) -> None:
        lines, self.lines = self.lines, []
        await asyncio.to_thread(self._append, "".join(lines))

    def _append(self, text: str) -> None:
        with open(self.config["path"], "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
