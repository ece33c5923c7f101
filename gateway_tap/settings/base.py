"""What every config section shares: unknown keys are errors, and each field says whether it reloads live.

A field is applied by a running process on reload (SIGHUP, ``tap.reload.watch``) unless
it is annotated :data:`RESTART`, which marks settings bound to sockets, processes or
connections: a change is reported and takes effect at the next restart. A nested
section inherits the mark of the field that holds it. The reloaders
(:mod:`gateway_tap.proxy.reload`, :mod:`collectors.reload`) and ``docs/configuration.md``
read the marks with :func:`restart_keys`, so the fact lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError


class _Restart:
    """Field marker: a change takes effect only after a restart."""

    def __repr__(self) -> str:
        return "RESTART"


RESTART: Final = _Restart()
"""``Annotated[T, RESTART]``: the field is read once at start (see the module docstring)."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable.

    :attr:`renamed_keys` maps keys this section used to have to their new names, so an
    old file fails naming the key and its replacement instead of only "extra inputs".
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    renamed_keys: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_renamed_keys(cls, data: Any) -> Any:
        if cls.renamed_keys and isinstance(data, Mapping):
            for old in sorted(key for key in cls.renamed_keys if key in data):
                raise PydanticCustomError("renamed_key", "{old} was renamed to {new}",
                                          {"old": old, "new": cls.renamed_keys[old]})
        return data


def restarts(model: type[BaseModel], field: str) -> bool:
    """True when ``model.field`` is marked :data:`RESTART`."""
    return RESTART in model.model_fields[field].metadata


def restart_keys(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of the fields marked :data:`RESTART` in ``model`` and its nested sections.

    A marked field is listed once (its whole subtree restarts); lists and dicts of sections
    are not descended into (a list item has no stable path to diff by).
    """
    keys: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if RESTART in info.metadata:
            keys.append(path)
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            keys.extend(restart_keys(info.annotation, path + "."))
    return tuple(keys)


def live_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The top-level fields of ``model`` that are not marked :data:`RESTART`."""
    return tuple(name for name in model.model_fields if not restarts(model, name))


def key_path(loc: tuple[Any, ...]) -> str:
    """``("llms", 0, "id")`` -> ``llms[0].id``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: ``prefix.key.path: message`` (``prefix`` e.g. ``collectors.file.config``)."""
    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        message = err["msg"]
        if err["type"] == "renamed_key":  # name the old key itself, as an unknown key would be named
            loc, message = (*loc, err["ctx"]["old"]), f"renamed to {err['ctx']['new']}"
        problems.append(f"{key_path((prefix, *loc) if prefix else loc)}: {message}")
    return problems
