"""An extension's own ``config`` (``plugins[i].config``, ``collectors.<NAME>.config``), checked in one place.

A tap plugin and a collector declare their config the same way, so one class can be both and keep one
declaration:

- ``Config``, a pydantic model (what the built-in collectors use): the config is validated by it and every
  default, nested ones included, is filled in;
- else ``config_schema``, a JSON Schema (draft 2020-12, formats checked), as a dict attribute (collectors'
  style) or a no-argument method returning it (plugins' style): ``default`` values of ``properties`` are
  filled in, at every depth of the objects present (``oneOf``/``anyOf``/``$ref`` are not followed).

Without either the config is taken as it is. Every problem is reported at once, one line each naming
its key path under the caller's prefix (``plugins[2].config.patterns: ...``).
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Mapping
from typing import Any

import jsonschema
import orjson
from pydantic import BaseModel, ValidationError

from gateway_tap.settings.base import format_validation_error


def config_model(extension: Any) -> type[BaseModel] | None:
    """The pydantic ``Config`` model ``extension`` (a class or an instance) declares, if any."""
    model = getattr(extension, "Config", None)
    return model if inspect.isclass(model) and issubclass(model, BaseModel) else None


def declared_schema(extension: Any) -> dict[str, Any] | None:
    """The JSON Schema of ``extension``'s config: its ``Config`` model's, else its ``config_schema`` (a dict,
    or a method returning one), else None.

    :raises Exception: whatever a ``config_schema()`` method (or, to call it on a class, the constructor) raised.
    """
    model = config_model(extension)
    if model is not None:
        return model.model_json_schema()
    schema = getattr(extension, "config_schema", None)
    if inspect.isclass(extension) and inspect.isfunction(schema):
        schema = extension().config_schema  # a method needs an instance (no-argument constructor)
    if callable(schema):
        schema = schema()
    return dict(schema) if isinstance(schema, Mapping) else None


def check_extension_config(extension: Any, config: Mapping[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``config`` as ``extension`` (a plugin or collector class, or an instance) gets it: validated against
    its declaration with every default filled in, and the problems found, one line each, prefixed ``where``
    (e.g. ``plugins[2].config``, ``collectors.file.config``).

    This is the one place both runtimes (and the admin API) check an extension's config and fill its
    defaults: ``initialize``, ``on_config_change`` and ``ctx.config`` all see what it returns.
    """
    model = config_model(extension)
    if model is not None:
        try:
            return model.model_validate(config).model_dump(), []
        except ValidationError as exc:
            return dict(config), format_validation_error(exc, where)
    try:
        schema = declared_schema(extension)
    except Exception as exc:
        return dict(config), [f"{where}: config_schema() raised {exc!r}"]
    if schema is None:
        return dict(config), []
    schema_problem = _schema_problem(schema)
    if schema_problem is not None:
        return dict(config), [f"{where}: config_schema is not a valid JSON Schema: {schema_problem}"]
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        problems.append(f"{where}{path}: {err.message}")
    if problems:
        return dict(config), problems
    return fill_defaults(schema, config), []


def _schema_problem(schema: Mapping[str, Any]) -> str | None:
    """Why ``schema`` is not a valid JSON Schema, or None. Remembered by its canonical JSON: checking a schema
    against the meta-schema takes milliseconds, and every reload (each admin change) checks every plugin's."""
    try:
        canonical = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # not JSON (e.g. a Python object inside): checked as it is, every time
        return _checked_schema(schema)
    return _known_schema_problem(canonical)


@functools.lru_cache(maxsize=256)
def _known_schema_problem(canonical: bytes) -> str | None:
    return _checked_schema(orjson.loads(canonical))


def _checked_schema(schema: Mapping[str, Any]) -> str | None:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return str(exc.message)
    return None


def fill_defaults(schema: Mapping[str, Any], value: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``value`` with the ``default`` of every property it lacks, recursively into the objects it
    has (or that a default created). Defaults are copied, so no two configs share a mutable default."""
    filled = dict(value)
    for key, prop in schema.get("properties", {}).items():
        if not isinstance(prop, Mapping):
            continue
        if key not in filled and "default" in prop:
            filled[key] = copy.deepcopy(prop["default"])
        if isinstance(filled.get(key), Mapping) and "properties" in prop:
            filled[key] = fill_defaults(prop, filled[key])
    return filled
