"""What the tap and the collectors share to reload their configuration file: metrics, change detection, diffs.

A reload (SIGHUP, or a change seen by ``tap.reload.watch``) validates the whole file
with :func:`gateway_tap.settings.load_config` first; an invalid file is rejected with
a logged error naming each key path, and the configuration in force stays.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel


class ReloadMetrics:
    """``<prefix>config_generation``, ``<prefix>config_last_reload_success`` and ``<prefix>config_reloads_total``.

    The generation is 0 for the configuration loaded at start and grows by one per
    successful reload. With several tap workers the generation shows the highest
    live worker's and the last result the lowest (one worker that failed shows 0).
    """

    def __init__(self, registry: CollectorRegistry, prefix: str, labels: Mapping[str, str] | None = None) -> None:
        names = list(labels or {})
        values = list((labels or {}).values())
        generation = Gauge(prefix + "config_generation", "Configuration generation in force (0: loaded at start, "
                           "+1 per successful reload).", names, registry=registry, multiprocess_mode="livemax")
        success = Gauge(prefix + "config_last_reload_success", "1 when the last configuration reload (or the "
                        "start) succeeded, 0 when it was rejected.", names, registry=registry,
                        multiprocess_mode="livemin")
        self.reloads = Counter(prefix + "config_reloads", "Configuration reloads by result (ok, invalid, failed).",
                               [*names, "result"], registry=registry)
        self.generation = generation.labels(*values) if names else generation
        self.last_success = success.labels(*values) if names else success
        self._values = values
        self.generation.set(0)
        self.last_success.set(1)

    def succeeded(self, generation: int) -> None:
        self.generation.set(generation)
        self.last_success.set(1)
        self.reloads.labels(*self._values, "ok").inc()

    def rejected(self, result: str) -> None:
        """``result``: ``invalid`` (the file failed validation) or ``failed`` (applying it failed)."""
        self.last_success.set(0)
        self.reloads.labels(*self._values, result).inc()


class FileFingerprint:
    """Detects content changes of one file cheaply: ``stat`` every poll, a hash only when mtime or size moved."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stat: tuple[int, int] | None = None
        self.digest: str | None = None

    def _stat_now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _hash_now(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def remember(self) -> None:
        """Record the file as it is now (call when it is (re)loaded, whatever the outcome)."""
        self._stat = self._stat_now()
        self.digest = self._hash_now()

    def changed(self) -> bool:
        """True when the content differs from the remembered one (a touch without change is not a change)."""
        stat = self._stat_now()
        if stat is None or stat == self._stat:
            return False
        self._stat = stat
        digest = self._hash_now()
        return digest is not None and digest != self.digest


def changed_keys(old: BaseModel, new: BaseModel, paths: Iterable[str]) -> list[str]:
    """Which dotted ``paths`` (e.g. ``tap.listen``) differ between two configs."""
    out = []
    for path in paths:
        if _get(old, path) != _get(new, path):
            out.append(path)
    return out


def _get(model: Any, path: str) -> Any:
    value = model
    for part in path.split("."):
        value = getattr(value, part)
    return value.model_dump() if isinstance(value, BaseModel) else value
