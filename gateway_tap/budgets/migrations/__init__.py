"""Versioned schema migrations, one folder per backend: ``<backend>/NNNN_name.sql``.

Applied by the store itself (:meth:`BudgetStore.migrate`), recorded in
``schema_migrations``; never edit an applied file, add the next number instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    def statements(self) -> list[str]:
        """The file's statements (split on ``;`` at line end: migrations hold no procedural bodies)."""
        parts = re.split(r";\s*(?:\n|$)", self.sql)
        out = []
        for part in parts:
            lines = [ln for ln in part.splitlines() if not ln.strip().startswith("--")]
            text = "\n".join(lines).strip()
            if text:
                out.append(text)
        return out


def load(backend: Literal["sqlite", "postgres"]) -> list[Migration]:
    """Every migration of ``backend``, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath(backend).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate {backend} migration version in {versions}")
    return found
