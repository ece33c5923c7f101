"""What every config section shares: unknown keys are errors, and each field says whether it reloads live.

A field is applied by a running process on reload (SIGHUP, ``tap.reload.watch``) unless
it is annotated :data:`RESTART`, which marks settings bound to sockets, processes or
connections: a change is reported and takes effect at the next restart. A nested
section inherits the mark of the field that holds it. The reloaders
(:mod:`gateway_tap.proxy.reload`, :mod:`collectors.reload`) and ``docs/configuration.md``
read the marks with :func:`restart_keys`, so the fact lives in one place.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Final

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
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


ID_PATTERN: Final = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$"
"""The one grammar of every id (apps, keys, plugins, LLMs, budgets' references, admin tokens): 1 to 64
letters, digits, ``.``, ``_`` or ``-``, not starting with ``.`` or ``-``. Ids appear in URL paths, file and
index names and command lines: never ``.`` or ``..``, never an option-like ``-x``, never too long to address."""
_ID = re.compile(ID_PATTERN)

Id = Annotated[str, Field(pattern=ID_PATTERN)]
"""A field holding an id (:data:`ID_PATTERN`)."""


def is_id(value: str) -> bool:
    """True when ``value`` follows :data:`ID_PATTERN` (e.g. an id taken from a URL path)."""
    return _ID.fullmatch(value) is not None


def control_characters(text: str) -> bool:
    """True when ``text`` holds a control character (C0, DEL, C1) or another non-printing format character
    (e.g. bidirectional overrides): what must never reach a terminal, a log line or an HTTP header raw."""
    return any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _display_text(value: str) -> str:
    if control_characters(value):
        raise ValueError("must not contain control characters")
    return value


DisplayText = Annotated[str, Field(max_length=200), AfterValidator(_display_text)]
"""A name shown to people (CLI tables, logs): at most 200 characters, no control characters."""

METADATA_MAX_DEPTH: Final = 8
"""Deepest nesting of lists and objects in metadata (``{"a": {"b": 1}}`` is 2 deep)."""
METADATA_MAX_BYTES: Final = 8 * 1024
"""Largest metadata object, counted as the UTF-8 of its keys and string values plus 8 bytes per other value."""


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """Bounded, JSON-only, printable: what the admin API stores, events carry and plugins read."""
    size = 0
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            if depth > METADATA_MAX_DEPTH:
                raise ValueError(f"{where or 'metadata'}: nested deeper than {METADATA_MAX_DEPTH} levels")
            for key, child in item.items():
                if not isinstance(key, str) or not key or len(key) > 64 or control_characters(key):
                    raise ValueError(f"{where or 'metadata'}: key {str(key)[:64]!r} must be 1 to 64 characters "
                                     "without control characters")
                size += len(key.encode())
                stack.append((child, depth + 1, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            if depth > METADATA_MAX_DEPTH:
                raise ValueError(f"{where or 'metadata'}: nested deeper than {METADATA_MAX_DEPTH} levels")
            stack.extend((child, depth + 1, f"{where}[{i}]") for i, child in enumerate(item))
        elif isinstance(item, str):
            if control_characters(item):
                raise ValueError(f"{where}: must not contain control characters")
            size += len(item.encode())
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{where}: {item} is not a JSON number")
        elif item is not None and not isinstance(item, (bool, int, float)):
            raise ValueError(f"{where}: {type(item).__name__} is not a JSON value")
        else:
            size += 8
        if size > METADATA_MAX_BYTES:
            raise ValueError(f"larger than {METADATA_MAX_BYTES} bytes")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]
"""Free-form labels (an app's owner, team, ...): JSON values, at most :data:`METADATA_MAX_DEPTH` deep and
:data:`METADATA_MAX_BYTES` large, keys of 1 to 64 characters, no control characters anywhere."""


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
