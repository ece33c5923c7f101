"""``docs/configuration.md``, generated from the settings declarations themselves.

Every key of ``gateway-tap.yaml`` (the sections of :mod:`gateway_tap.settings`, and the
``config`` of each built-in collector, declared by its ``Config`` model) with its full
dotted path, type, default, whether a running process applies it on reload or needs a
restart (the ``RESTART`` marks the reloaders read), and its description. Regenerate with::

    python -m gateway_tap.config_docs > docs/configuration.md

``tests/settings/test_config_docs.py`` fails when the committed document is out of date.
"""

from __future__ import annotations

import inspect
import json
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway_tap.settings import GatewayConfig
from gateway_tap.settings.base import RESTART

DICT_KEYS = {"collectors": "<NAME>", "prices": "<model>"}
"""The placeholder shown for the keys of a mapping field (default ``<key>``)."""


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One row of the document: a key with its full dotted path."""

    path: str
    type: str
    default: str
    restart: bool
    description: str

    @property
    def reload(self) -> str:
        """``restart``, ``live``, or ``per key`` for a section whose keys say it themselves."""
        return "restart" if self.restart else ("per key" if self.type == "section" else "live")


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The model class of a section-valued annotation (``X`` or ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        found = [a for a in get_args(annotation) if a is not type(None)]
        if len(found) == 1:
            return _section_of(found[0])
    return None


def _item_of(annotation: Any) -> tuple[str, Any] | None:
    """``("[]", item)`` for a list/tuple of sections, ``(".<key>", value)`` for a mapping, else None."""
    if get_origin(annotation) in (Union, types.UnionType):
        found = [a for a in get_args(annotation) if a is not type(None)]
        return _item_of(found[0]) if len(found) == 1 else None
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (list, tuple) and args and _section_of(args[0]):
        return "[]", args[0]
    if origin is dict and len(args) == 2 and _section_of(args[1]):
        return ".", args[1]
    return None


_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null", Any: "any"}


def type_name(annotation: Any) -> str:
    """A reader's name for a field type: ``integer``, ``string or null``, ``list of string``, ``one of: a, b``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        ordered = sorted(args, key=lambda a: a is type(None))  # null last
        return " or ".join(type_name(a) for a in ordered)
    if origin is Literal:
        return "one of: " + ", ".join(f"`{v}`" for v in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _constraints(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            parts.append(f"> {item.gt}")
        elif isinstance(item, annotated_types.Ge):
            parts.append(f"≥ {item.ge}")
        elif isinstance(item, annotated_types.Lt):
            parts.append(f"< {item.lt}")
        elif isinstance(item, annotated_types.Le):
            parts.append(f"≤ {item.le}")
        elif isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} long")
        elif getattr(item, "pattern", None):
            parts.append(f"matching `{item.pattern}`")
    return ", ".join(parts)


def _value(value: Any, name: str) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    shown = f"`{text}`" if text != "" else '`""`'
    if name.endswith("_bytes") and isinstance(value, int) and value >= 1024:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{shown} ({value // size} {unit})"
    return shown


def _default(info: FieldInfo, name: str) -> str:
    factory = info.default_factory
    if factory is not None:
        if isinstance(factory, type) and issubclass(factory, BaseModel):
            return ""
        if factory in (list, dict, tuple) or getattr(factory, "__name__", "") == "<lambda>":
            return _value(factory(), name)  # type: ignore[call-arg]
        return "computed (see description)"
    if info.default is PydanticUndefined:
        return "required"
    value = info.default
    return _value(value.model_dump(mode="json") if isinstance(value, BaseModel) else value, name)


def _doc(model: type[BaseModel]) -> str:
    return inspect.cleandoc(model.__doc__ or "").replace("``", "`")


def describe(model: type[BaseModel], prefix: str = "", restart: bool = False,
             seen: dict[type[BaseModel], str] | None = None) -> list[KeyDoc]:
    """Rows for every field of ``model`` and of the sections below it, in declaration order.

    A section documented earlier (the budget collector's ``store`` is a ``budget_store``) gets one
    row pointing at it instead of its keys again. ``restart`` is inherited by nested keys.
    """
    seen = {} if seen is None else seen
    rows: list[KeyDoc] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        marked = restart or RESTART in info.metadata
        description = (info.description or "").replace("``", "`")
        section, item = _section_of(info.annotation), _item_of(info.annotation)
        if section is not None or item is not None:
            if item is not None:
                joint, inner = item
                child = _section_of(inner)
                assert child is not None
                sub = f"{path}[]" if joint == "[]" else f"{path}.{DICT_KEYS.get(name, '<key>')}"
            else:
                assert section is not None
                child, sub = section, path
            first = _doc(child).split("\n\n")[0].replace("\n", " ")
            if child in seen:
                rows.append(KeyDoc(path, type_name(info.annotation), _default(info, name), marked,
                                   " ".join(p for p in (description, f"Same keys as `{seen[child]}`.") if p)))
                continue
            rows.append(KeyDoc(path, type_name(info.annotation), _default(info, name), marked, description or first))
            seen[child] = sub
            rows += describe(child, sub + ".", marked, seen)
            continue
        text = " ".join(p for p in (description, _constraints(info) and f"({_constraints(info)})") if p)
        rows.append(KeyDoc(path, type_name(info.annotation), _default(info, name), marked, text))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "\\<")  # markdown: no table break, no HTML tag


def _table(rows: list[KeyDoc]) -> list[str]:
    lines = ["| key | type | default | reload | description |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{_cell(r.path)}` | {_cell(r.type)} | {_cell(r.default)} | "
                     f"{r.reload} | {_cell(r.description)} |")
    return lines


def builtin_collectors() -> list[tuple[str, type[BaseModel]]]:
    """``(name, Config)`` of each built-in collector, in registry order."""
    from collectors.registry import BUILTINS, resolve_collector

    out = []
    for name in BUILTINS:
        config = resolve_collector(name).Config
        assert config is not None, f"built-in collector {name} declares no Config model"
        out.append((name, config))
    return out


_INTRO = """\
# Configuration

<!-- Generated by `python -m gateway_tap.config_docs > docs/configuration.md`; do not edit by hand.
     tests/settings/test_config_docs.py fails when this file is out of date. -->

One YAML file configures the tap (`gateway-tap serve`) and every collector worker (`gateway-tap collect
NAME`); `gateway_tap/examples/gateway-tap.yaml` is a complete example. Every process validates the whole file at
start (`gateway-tap check-config FILE` does too, plugin configs included; a collector checks its own
`config` when it starts): an unknown key, a wrong type or a value out of range stops it with one line
per problem naming its key path, e.g. `tap.listen.port: Input should be less than or equal to 65535`.
A renamed key says so: `collectors.elasticsearch.config.request_timeout: renamed to
request_timeout_s`. Secrets never go in the file: keys ending in `_env` name the environment variable
that holds them. Names carry their unit (`_ms`, `_s`, `_bytes`, `_days`).

**reload**: a running process re-reads the file on SIGHUP (and the tap also when it changes, with
`tap.reload.watch`). `live` keys take effect then, between requests or batches, without losing any; a
file that fails validation is rejected and the configuration in force stays. `restart` keys are read
once at start: a changed one is logged and takes effect at the next restart. A collector worker
applies its own `collectors.<NAME>` section and the sections it falls back on (`budgets`,
`budget_store`: it is re-initialised with them) live, except the keys marked restart there; of the
rest of the file it reads only `kafka`.

Keys of list items are written `llms[].id`; keys of mappings `collectors.<NAME>.batch`. The source of
truth is the pydantic models in `gateway_tap/settings/` (and each built-in collector's `Config`); each
description here is the field's own.
"""


def render() -> str:
    """The whole ``docs/configuration.md``."""
    seen: dict[type[BaseModel], str] = {}
    every = describe(GatewayConfig, "", False, seen)
    lines = [_INTRO]
    for name, info in GatewayConfig.model_fields.items():
        rows = [r for r in every if r.path == name or r.path.startswith((f"{name}.", f"{name}["))]
        item = _item_of(info.annotation)
        section = _section_of(info.annotation) or (_section_of(item[1]) if item else None)
        text = _doc(section) if section is not None else (info.description or "")
        lines += [f"## `{name}`", "", text, "", *_table(rows), ""]
    lines += ["## Built-in collectors' `config`", "",
              "`collectors.<NAME>.config` of a collector running a built-in (NAME is the built-in's name, or "
              "`plugin:` names it). Collectors of your own declare theirs the same way "
              "(`docs/writing-collectors.md`).", ""]
    for name, model in builtin_collectors():
        lines += [f"### `{name}`", "", _doc(model), "",
                  *_table(describe(model, f"collectors.{name}.config.", False, seen)), ""]
    return "\n".join(lines)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
